//! One live QUIC connection to a node: request/reply matching and the push stream.
//!
//! A reader task decodes `ServerFrame`s: replies complete their request's oneshot, pushes go to
//! the bounded event channel with their sequence numbers checked (a gap is reported as
//! [`Event::Gap`]). Writes go through a mutex-guarded send stream, one frame per request.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use futures::StreamExt;
use meshchat_proto::FrameCodec;
use meshchat_proto::client::{
    self as pb, ClientFrame, ErrorCode, ServerFrame, client_frame, push, server_frame,
};
use meshchat_proto::codec::encode_into;
use parking_lot::Mutex;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::codec::FramedRead;
use tracing::debug;

use crate::error::ClientError;
use crate::liveness::{self, DEAD_REASON};

/// Something the node pushed, or a change in the connection.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A new message in one of my chats (from someone else, or from my other device).
    Message(pb::Message),
    /// Someone marked messages delivered or seen.
    Receipt(pb::ReceiptEvent),
    /// A reaction was set (or removed: empty emoji).
    Reaction(pb::ReactionEvent),
    /// Channel membership changed.
    Channel(pb::ChannelEvent),
    /// Contacts (users I share a 1:1 chat with) came online or went offline. Of two states of
    /// one user, the one with the later `changed_unix_ms` is current (pushes can cross during
    /// a ring change).
    Presence(pb::PresenceEvent),
    /// Someone started or stopped typing in one of my chats. Feed it to a
    /// [`crate::TypingTracker`], which expires indicators by themselves.
    Typing(pb::TypingEvent),
    /// The node asks this client to reconnect elsewhere.
    Redirect(pb::Redirect),
    /// The node reported an error that answers no request (a malformed or oversized frame,
    /// an authentication timeout). `code` is an `ErrorCode`.
    NodeError {
        /// Protocol error code.
        code: i32,
        /// The node's message.
        message: String,
    },
    /// The node says pushes meant for this user may have been lost between nodes (a full
    /// queue on the way, a link that died, a node cut off that came back): fill the gap
    /// from history with [`crate::Client::resync`], which reads further back than the fill
    /// for [`Event::Gap`].
    Resync,
    /// Pushes were lost on this connection (`expected` was due, `got` arrived).
    Gap {
        /// Sequence number that was due.
        expected: u64,
        /// Sequence number that arrived.
        got: u64,
    },
    /// The node has been silent past [`ConnectOptions::suspect_after`]: it may have died.
    /// Call [`crate::Client::rehome_early`] (a supervised client does it by itself). A hint:
    /// not sent if the event buffer is full.
    Silent,
    /// The client's connection closed; `code` is the node's error code when it closed on
    /// purpose. Not sent for a connection the client replaced itself (a redirect followed, a
    /// reconnect, a move to another node, an early re-home); a reconnect that fails says so
    /// with one (reason "reconnect failed: ...").
    Disconnected {
        /// Protocol error code of the close (0 = none).
        code: u64,
        /// Reason text.
        reason: String,
    },
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<ServerFrame>>>>;

/// Transport settings for a client connection.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// CA certificates to trust (the cluster's CA; in dev, `<data-dir>/ca.pem`).
    pub roots: Vec<rustls_pki_types::CertificateDer<'static>>,
    /// How long a request waits for its reply.
    pub request_timeout: Duration,
    /// Pushes buffered for the application. When it is full the reader stops reading, the
    /// node's queue for this connection fills, and the node cuts the connection off as a slow
    /// reader (the client then reconnects and fills the gap from history).
    pub event_buffer: usize,
    /// Largest frame accepted from the node.
    pub max_frame: usize,
    /// QUIC keep-alive interval (must be well below the idle timeout). It is also how soon an
    /// idle client learns that its node died: a keep-alive that the node does not
    /// acknowledge within [`Self::liveness_timeout`] ends the connection (default 2 s, so an
    /// idle client notices a dead node within 7.5 s; the node answers each keep-alive with
    /// one ACK: 0.5 packets/s each way per idle client).
    pub keep_alive: Duration,
    /// How long the node may stay completely silent (not even a transport ACK) after this
    /// client sent it something that needs an answer, before the connection is declared
    /// dead and closed (default 5 s). ACKs come from the node's QUIC stack, not from its
    /// request handlers, so a node that is slow to answer requests but alive is not taken
    /// for dead: only a dead process, host or path is. Not shorter: when a node dies, its
    /// clients' failover loads the survivors, whose UDP receive queues can overflow for
    /// seconds; at 2.5 s that took live connections for dead and failed them over too, a
    /// cascade (load test, 10k connections, docs/RELIABILITY.md).
    pub liveness_timeout: Duration,
    /// How long the node may stay silent (as for [`Self::liveness_timeout`]) before the
    /// connection counts as *silent* ([`Conn::is_silent`]; default 3 s). A supervised client
    /// then tries its predicted new home (within a second, at random, unless the node is
    /// heard again meanwhile), without closing this connection: that
    /// node authenticates it only if the ring no longer has the silent node (it died and its
    /// registration expired), and otherwise redirects it back, so a slow node never loses a
    /// client this way; the first answer from the silent node calls the attempt off. A dead
    /// node's clients re-home 1.5-2.5 s sooner than the liveness timeout alone allows. Not
    /// after a slowdown: a silence that begins with the node's RTT above 4x its lowest +
    /// 100 ms is left to the liveness timeout (a busy node's clients must not all try other
    /// nodes at once). Not below
    /// the keep-alive interval; zero, or at or above the liveness timeout, turns it off.
    pub suspect_after: Duration,
    /// Bound on one connection attempt (QUIC handshake plus the protocol stream; default 8 s):
    /// a dead node must not hold a failover for the whole idle timeout, and a busy survivor
    /// must not see its handshakes abandoned (and repeated) half-way.
    pub connect_timeout: Duration,
    /// Other nodes to try when the current one is unreachable (`host:port`); the client also
    /// learns the cluster's members after it logs in.
    pub seeds: Vec<String>,
    /// QUIC idle timeout this client offers (the connection uses the smaller of this and
    /// the node's). quinn's default is 30 s, which left a 20 s keep-alive one late packet
    /// from a timeout on a busy host (load test: 1.7k idle-timeout drops at 100k
    /// connections); default 60 s, the node's default.
    pub idle_timeout: Duration,
    /// QUIC receive window of the protocol stream, in bytes.
    pub stream_receive_window: u32,
    /// Resume with 0-RTT when this endpoint holds a session ticket for the node's name
    /// (default on; a ticket is good at the node that issued it, once). Replay-safe requests
    /// ([`meshchat_proto::replay_safe`]: the hello, `Authenticate`, reads, sends) go in the
    /// first flight and are answered without waiting for the handshake; others wait for it.
    /// If the node does not take the early data, it is sent again once the handshake
    /// completes.
    pub zero_rtt: bool,
    /// Never show this user online through this client's connections (sent in each hello,
    /// so a connection is hidden from its first moment; [`crate::Client::set_presence_hidden`]
    /// changes it for the live connection and the ones after it). Default off.
    pub hide_presence: bool,
}

impl ConnectOptions {
    /// Defaults trusting `roots`.
    pub fn new(roots: Vec<rustls_pki_types::CertificateDer<'static>>) -> Self {
        Self {
            roots,
            request_timeout: Duration::from_secs(15),
            event_buffer: 1024,
            max_frame: 1 << 20,
            keep_alive: Duration::from_secs(2),
            liveness_timeout: Duration::from_secs(5),
            suspect_after: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(8),
            seeds: Vec::new(),
            idle_timeout: Duration::from_secs(60),
            stream_receive_window: 256 * 1024,
            zero_rtt: true,
            hide_presence: false,
        }
    }
}

/// A QUIC client endpoint; one can carry many connections.
pub fn client_endpoint(
    opts: &ConnectOptions,
    bind: SocketAddr,
) -> Result<quinn::Endpoint, ClientError> {
    let mut endpoint =
        quinn::Endpoint::client(bind).map_err(|e| ClientError::Setup(format!("endpoint: {e}")))?;
    endpoint.set_default_client_config(client_config(opts)?);
    Ok(endpoint)
}

/// A client endpoint on a UDP socket the caller made (say, with large kernel buffers for a
/// load generator's handshake bursts).
pub fn client_endpoint_on(
    opts: &ConnectOptions,
    socket: std::net::UdpSocket,
) -> Result<quinn::Endpoint, ClientError> {
    let runtime =
        quinn::default_runtime().ok_or_else(|| ClientError::Setup("no async runtime".into()))?;
    let mut endpoint =
        quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime)
            .map_err(|e| ClientError::Setup(format!("endpoint: {e}")))?;
    endpoint.set_default_client_config(client_config(opts)?);
    Ok(endpoint)
}

/// The TLS and transport settings every client connection uses: TLS 1.3, ALPN
/// `meshchat/1`, one stream, keep-alives, no path MTU discovery.
pub fn client_config(opts: &ConnectOptions) -> Result<quinn::ClientConfig, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    for r in &opts.roots {
        roots
            .add(r.clone())
            .map_err(|e| ClientError::Setup(format!("CA certificate: {e}")))?;
    }
    // AES-128-GCM first: the cheapest suite for the node (meshchat_backplane::tls::provider).
    let mut tls = rustls::ClientConfig::builder_with_provider(meshchat_backplane::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Setup(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![meshchat_proto::CLIENT_ALPN.to_vec()];
    // Session tickets (kept in memory per endpoint) may carry 0-RTT; whether a connection
    // uses them is `ConnectOptions::zero_rtt`.
    tls.enable_early_data = true;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| ClientError::Setup(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(opts.keep_alive))
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(opts.idle_timeout)
                .map_err(|e| ClientError::Setup(format!("idle timeout: {e}")))?,
        ))
        .max_concurrent_bidi_streams(0u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window(opts.stream_receive_window.into())
        .receive_window((opts.stream_receive_window.saturating_mul(2)).into())
        .mtu_discovery_config(None);
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Splits `host:port` into a socket address and the TLS server name.
pub fn resolve(server: &str) -> Result<(SocketAddr, String), ClientError> {
    use std::net::ToSocketAddrs;
    let addr = server
        .to_socket_addrs()
        .map_err(|e| ClientError::Setup(format!("server address {server:?}: {e}")))?
        .next()
        .ok_or_else(|| {
            ClientError::Setup(format!("server address {server:?} resolves to nothing"))
        })?;
    let host = match server.rsplit_once(':') {
        Some((h, _)) => h.trim_matches(|c| c == '[' || c == ']').to_owned(),
        None => server.to_owned(),
    };
    Ok((addr, host))
}

/// One connection with its reader task.
#[derive(Debug)]
pub struct Conn {
    conn: quinn::Connection,
    send: tokio::sync::Mutex<quinn::SendStream>,
    pending: Pending,
    next_id: AtomicU64,
    timeout: Duration,
    max_frame: usize,
    /// True while the node is silent past [`ConnectOptions::suspect_after`].
    silent: Arc<watch::Sender<bool>>,
    /// While set, the connection's own `Silent` and `Disconnected` events are not sent (a
    /// candidate that is not this client's connection yet, or one it replaced).
    muted: Arc<AtomicBool>,
    /// False while the handshake of a 0-RTT connection is in progress; true after it (at
    /// once for a connection made without 0-RTT).
    handshaken: watch::Sender<bool>,
    /// Frames written in 0-RTT data while the handshake is in progress, to be written again
    /// on a new stream if the node rejects the early data; `None` once the handshake is over.
    /// Bounded by what the caller sends within one handshake.
    early_sent: Mutex<Option<Vec<bytes::Bytes>>>,
    /// What became of 0-RTT on this connection.
    zero_rtt: Mutex<ZeroRtt>,
}

/// Whether a connection resumed with 0-RTT, and what the node made of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroRtt {
    /// A full handshake: no session ticket for the node, or 0-RTT turned off.
    NotTried,
    /// Requests went in 0-RTT data; the handshake is in progress.
    Pending,
    /// The node took the early data (and may have answered from it).
    Accepted,
    /// The node did not take it (a ticket it does not hold): what was written there was sent
    /// again once the handshake completed.
    Rejected,
    /// The node did not answer within the connect timeout: the connection was closed and
    /// the requests written early failed.
    TimedOut,
}

/// What a connection's reader needs (kept to start a reader on a new stream).
#[derive(Clone)]
struct ReaderParts {
    pending: Pending,
    events: mpsc::Sender<Event>,
    muted: Arc<AtomicBool>,
    max_frame: usize,
    dead: Arc<AtomicBool>,
}

impl Conn {
    /// Connects to `server` and opens the protocol stream. Events go to `events`.
    pub async fn open(
        endpoint: &quinn::Endpoint,
        server: &str,
        opts: &ConnectOptions,
        events: mpsc::Sender<Event>,
    ) -> Result<Arc<Self>, ClientError> {
        let (addr, name) = resolve(server)?;
        let connecting = endpoint
            .connect(addr, &name)
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        let (conn, early, state, (send, recv)) =
            tokio::time::timeout(opts.connect_timeout, async {
                // With a ticket, 0-RTT: the connection is usable at once, its first requests go
                // in the first flight. Without one, a full handshake.
                let connecting = if opts.zero_rtt {
                    match connecting.into_0rtt() {
                        Ok((conn, accepted)) => return open_stream(conn, Some(accepted)).await,
                        Err(connecting) => connecting,
                    }
                } else {
                    connecting
                };
                let conn = connecting
                    .await
                    .map_err(|e| ClientError::Connect(e.to_string()))?;
                open_stream(conn, None).await
            })
            .await
            .map_err(|_| {
                ClientError::Connect(format!(
                    "{server}: no answer within {:?}",
                    opts.connect_timeout
                ))
            })??;
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let this = Arc::new(Self {
            conn: conn.clone(),
            send: tokio::sync::Mutex::new(send),
            pending: pending.clone(),
            next_id: AtomicU64::new(1),
            timeout: opts.request_timeout,
            max_frame: opts.max_frame,
            silent: Arc::new(watch::channel(false).0),
            muted: Arc::new(AtomicBool::new(false)),
            handshaken: watch::channel(early.is_none()).0,
            early_sent: Mutex::new(early.is_some().then(Vec::new)),
            zero_rtt: Mutex::new(state),
        });
        let dead = Arc::new(AtomicBool::new(false));
        liveness::watch(liveness::ConnWatch {
            judge: liveness::Judge::new(
                liveness::Liveness {
                    timeout: opts.liveness_timeout,
                    suspect_after: opts.suspect_after,
                },
                liveness::seen(&conn),
                std::time::Instant::now(),
            ),
            conn: conn.clone(),
            dead: dead.clone(),
            silent: this.silent.clone(),
            events: events.clone(),
            muted: this.muted.clone(),
        });
        let parts = ReaderParts {
            pending,
            events,
            muted: this.muted.clone(),
            max_frame: opts.max_frame,
            dead,
        };
        match early.map(futures::FutureExt::shared) {
            Some(accepted) => {
                let (ended_tx, ended) = oneshot::channel();
                tokio::spawn(read_loop(
                    conn,
                    recv,
                    parts.clone(),
                    Some((accepted.clone(), ended_tx)),
                ));
                tokio::spawn(finish_early(
                    this.clone(),
                    accepted,
                    ended,
                    parts,
                    opts.connect_timeout,
                ));
            }
            None => {
                tokio::spawn(read_loop(conn, recv, parts, None));
            }
        }
        Ok(this)
    }

    /// Resolves when the connection is closed (by either side, or found dead).
    pub async fn closed(&self) {
        self.conn.closed().await;
    }

    /// The QUIC connection's statistics (paths validated, frames, round-trip time).
    pub fn stats(&self) -> quinn::ConnectionStats {
        self.conn.stats()
    }

    /// Whether the connection is still open.
    pub fn is_open(&self) -> bool {
        self.conn.close_reason().is_none()
    }

    /// Whether the node has been silent past [`ConnectOptions::suspect_after`]: it may have
    /// died. Stays true once the liveness check closed the connection as dead.
    pub fn is_silent(&self) -> bool {
        *self.silent.borrow()
    }

    /// Resolves once the connection is silent ([`Conn::is_silent`]), also after the liveness
    /// check closed it as dead (check [`Conn::is_open`]); never if it closed otherwise
    /// first.
    pub async fn silenced(&self) {
        self.wait_silence(true).await;
    }

    /// Resolves once the node is heard again after a silence (at once if it is not
    /// silent); never if the connection closes first.
    pub async fn heard(&self) {
        self.wait_silence(false).await;
    }

    async fn wait_silence(&self, silent: bool) {
        let mut rx = self.silent.subscribe();
        if rx.wait_for(|s| *s == silent).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// The node's address.
    pub fn remote(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    /// Mutes (or unmutes) this connection's own `Silent` and `Disconnected` events: a
    /// candidate connection that may be dropped must not look like the client's connection
    /// failing.
    pub(crate) fn set_muted(&self, muted: bool) {
        self.muted.store(muted, Ordering::SeqCst);
    }

    /// Closes the connection.
    pub fn close(&self) {
        self.conn.close(0u32.into(), b"client closing");
    }

    /// Closes a connection this client has replaced (followed a redirect, reconnected,
    /// switched nodes): its end is no event for the application, which goes on with the new
    /// one. (An application that reconnected on every `Disconnected` would otherwise loop.)
    pub(crate) fn retire(&self) {
        self.set_muted(true);
        self.close();
    }

    /// Sends raw bytes on the protocol stream (for tests of malformed input). In 0-RTT data
    /// while the handshake is in progress: they are sent again if the node rejects it.
    pub async fn send_raw(&self, bytes: &[u8]) -> Result<(), ClientError> {
        let mut s = self.send.lock().await;
        let early = match self.early_sent.lock().as_mut() {
            Some(sent) => {
                sent.push(bytes::Bytes::copy_from_slice(bytes));
                true
            }
            None => false,
        };
        match s.write_all(bytes).await {
            Ok(()) => {}
            // Rejected 0-RTT data: `finish_early` writes it again on a new stream.
            Err(quinn::WriteError::ZeroRttRejected) if early => return Ok(()),
            Err(e) => return Err(ClientError::Disconnected(e.to_string())),
        }
        s.flush()
            .await
            .map_err(|e| ClientError::Disconnected(e.to_string()))
    }

    /// Whether this connection's handshake is complete (a 0-RTT connection serves requests
    /// before it is).
    pub fn is_handshaken(&self) -> bool {
        *self.handshaken.borrow()
    }

    /// Whether this connection resumed with 0-RTT, and whether the node took it.
    pub fn zero_rtt(&self) -> ZeroRtt {
        *self.zero_rtt.lock()
    }

    /// Resolves once the handshake is complete (and, after rejected 0-RTT data, the stream
    /// opened again); at once for a connection made without 0-RTT.
    pub async fn handshake_complete(&self) {
        let mut rx = self.handshaken.subscribe();
        let _ = rx.wait_for(|done| *done).await;
    }

    /// Waits for a reply with `request_id` (used with [`Conn::send_raw`]).
    pub fn expect_reply(&self, request_id: u64) -> oneshot::Receiver<ServerFrame> {
        let (tx, rx) = oneshot::channel();
        self.pending.lock().insert(request_id, tx);
        rx
    }

    /// Sends a request and waits for its reply body. Node errors become
    /// [`ClientError::Server`].
    pub async fn request(
        &self,
        body: client_frame::Body,
    ) -> Result<server_frame::Body, ClientError> {
        // Requests a replay could harm never go in 0-RTT data.
        if !meshchat_proto::replay_safe(&body) {
            self.handshake_done_within().await?;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut buf = BytesMut::new();
        encode_into(
            &ClientFrame {
                request_id: id,
                body: Some(body),
            },
            self.max_frame,
            &mut buf,
        )
        .map_err(|e| ClientError::Setup(format!("request does not encode: {e}")))?;
        match self.request_once(id, &buf).await {
            // The node read it as early data (a client that sent it before its handshake
            // was done, through `send_raw`): once the handshake is complete it is not early
            // any more. Sent again as it was.
            Err(e) if e.code() == Some(ErrorCode::TooEarly) => {
                self.handshake_done_within().await?;
                self.request_once(id, &buf).await
            }
            other => other,
        }
    }

    async fn handshake_done_within(&self) -> Result<(), ClientError> {
        tokio::time::timeout(self.timeout, self.handshake_complete())
            .await
            .map_err(|_| ClientError::Timeout)
    }

    /// Sends request `id`, encoded in `buf`, and waits for its reply body.
    async fn request_once(&self, id: u64, buf: &[u8]) -> Result<server_frame::Body, ClientError> {
        let rx = self.expect_reply(id);
        // One deadline for the write and the reply: a node that stops reading must not hang
        // the caller in the write.
        let deadline = tokio::time::Instant::now() + self.timeout;
        match tokio::time::timeout_at(deadline, self.send_raw(buf)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                self.pending.lock().remove(&id);
                return Err(e);
            }
            Err(_) => {
                self.pending.lock().remove(&id);
                return Err(ClientError::Timeout);
            }
        }
        let frame = match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(f)) => f,
            Ok(Err(_)) => {
                return Err(ClientError::Disconnected(
                    self.conn
                        .close_reason()
                        .map(|r| r.to_string())
                        .unwrap_or_else(|| "connection closed".into()),
                ));
            }
            Err(_) => {
                self.pending.lock().remove(&id);
                return Err(ClientError::Timeout);
            }
        };
        match frame.body {
            Some(server_frame::Body::Error(e)) => Err(ClientError::Server {
                code: ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified),
                message: e.message,
            }),
            Some(b) => Ok(b),
            None => Err(ClientError::Protocol("reply without a body".into())),
        }
    }
}

/// A connection, its 0-RTT acceptance (while its protocol stream is a 0-RTT one), what
/// became of 0-RTT, and its protocol stream.
type Opened = (
    quinn::Connection,
    Option<quinn::ZeroRttAccepted>,
    ZeroRtt,
    (quinn::SendStream, quinn::RecvStream),
);

/// Opens the protocol stream of `conn` (at once in 0-RTT: a stream needs no round trip).
async fn open_stream(
    conn: quinn::Connection,
    early: Option<quinn::ZeroRttAccepted>,
) -> Result<Opened, ClientError> {
    let streams = conn
        .open_bi()
        .await
        .map_err(|e| ClientError::Connect(e.to_string()))?;
    // A handshake that completed before the stream was opened (a busy client: the node's
    // answer came first) leaves nothing early: the stream is an ordinary one.
    let (early, state) = match early {
        Some(accepted) if streams.1.is_0rtt() => (Some(accepted), ZeroRtt::Pending),
        Some(accepted) => match futures::FutureExt::now_or_never(accepted) {
            Some(true) => (None, ZeroRtt::Accepted),
            Some(false) => (None, ZeroRtt::Rejected),
            None => (None, ZeroRtt::NotTried),
        },
        None => (None, ZeroRtt::NotTried),
    };
    Ok((conn, early, state, streams))
}

/// Waits for a 0-RTT connection's handshake. If the node did not take the early data (it
/// does not hold the ticket: another node issued it, it was evicted, or the node restarted),
/// what was written there is lost: opens the stream again on the now complete connection,
/// starts its reader and writes those frames again, so requests in flight are answered as if
/// nothing happened. `early_reader_gone` resolves once the rejected stream's reader has
/// dropped it.
async fn finish_early(
    this: Arc<Conn>,
    accepted: futures::future::Shared<quinn::ZeroRttAccepted>,
    early_reader_gone: oneshot::Receiver<()>,
    parts: ReaderParts,
    connect_timeout: Duration,
) {
    // A 0-RTT connection is usable before the node has answered at all: a node that never
    // answers (dead, unreachable) is given up at the connect timeout, as without 0-RTT, and
    // the requests waiting on it fail then.
    let taken = match tokio::time::timeout(connect_timeout, accepted).await {
        Ok(taken) => {
            *this.zero_rtt.lock() = if taken {
                ZeroRtt::Accepted
            } else {
                ZeroRtt::Rejected
            };
            taken
        }
        Err(_) => {
            *this.zero_rtt.lock() = ZeroRtt::TimedOut;
            this.conn.close(0u32.into(), b"handshake timed out");
            false
        }
    };
    // Writers hold this lock while they record and write: none is half-way below.
    let mut send = this.send.lock().await;
    let frames = this.early_sent.lock().take().unwrap_or_default();
    if !taken && this.conn.close_reason().is_none() {
        debug!(
            frames = frames.len(),
            "0-RTT data rejected: sending it again"
        );
        // The new stream has the rejected one's id, and quinn forgets a stream's waiting
        // reader (by id) when a handle of it is dropped: the old handles go first. (Its
        // reader wakes with an error on the rejection; dropped, the sender errs here too.)
        let _ = early_reader_gone.await;
        match this.conn.open_bi().await {
            Ok((s, r)) => {
                drop(std::mem::replace(&mut *send, s));
                tokio::spawn(read_loop(this.conn.clone(), r, parts, None));
                for f in &frames {
                    if send.write_all(f).await.is_err() {
                        break;
                    }
                }
            }
            Err(e) => {
                debug!(error = %e, "no stream after a rejected 0-RTT");
                this.conn.close(0u32.into(), b"no stream after 0-RTT");
            }
        }
    }
    drop(send);
    this.handshaken.send_replace(true);
}

async fn read_loop(
    conn: quinn::Connection,
    recv: quinn::RecvStream,
    parts: ReaderParts,
    early: Option<(
        futures::future::Shared<quinn::ZeroRttAccepted>,
        oneshot::Sender<()>,
    )>,
) {
    let ReaderParts {
        pending,
        events,
        muted,
        max_frame,
        dead,
    } = parts;
    let mut reader = FramedRead::new(recv, FrameCodec::<ServerFrame, ClientFrame>::new(max_frame));
    let mut next_seq = 1u64;
    while let Some(frame) = reader.next().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                debug!(error = %e, "read failed");
                break;
            }
        };
        if frame.request_id != 0 {
            if let Some(tx) = pending.lock().remove(&frame.request_id) {
                let _ = tx.send(frame);
            }
            continue;
        }
        let event = match frame.body {
            Some(server_frame::Body::Push(p)) => {
                if p.seq != next_seq {
                    let _ = events
                        .send(Event::Gap {
                            expected: next_seq,
                            got: p.seq,
                        })
                        .await;
                }
                next_seq = p.seq + 1;
                match p.event {
                    Some(push::Event::Message(m)) => Event::Message(m),
                    Some(push::Event::Receipt(r)) => Event::Receipt(r),
                    Some(push::Event::Reaction(r)) => Event::Reaction(r),
                    Some(push::Event::Channel(c)) => Event::Channel(c),
                    Some(push::Event::Redirect(r)) => Event::Redirect(r),
                    Some(push::Event::Resync(_)) => Event::Resync,
                    Some(push::Event::Typing(t)) => Event::Typing(t),
                    Some(push::Event::Presence(p)) => Event::Presence(p),
                    None => continue,
                }
            }
            // An unsolicited error (frame too large, auth timeout) or redirect.
            Some(server_frame::Body::Redirect(r)) => Event::Redirect(r),
            Some(server_frame::Body::Error(e)) => Event::NodeError {
                code: e.code,
                message: e.message,
            },
            _ => continue,
        };
        if events.send(event).await.is_err() {
            // Nobody listens; keep serving replies.
            continue;
        }
    }
    // The stream of rejected 0-RTT data ends while the connection lives on: `finish_early`
    // opens another (once this one is dropped) and starts its reader; the requests stay
    // pending.
    if let Some((accepted, ended)) = early
        && !accepted.await
        && conn.close_reason().is_none()
    {
        drop(reader);
        let _ = ended.send(());
        return;
    }
    // Fail every waiting request now rather than at its timeout.
    pending.lock().clear();
    // The node finishes the stream just before it closes the connection with a code; wait
    // briefly for that close so the event carries the reason.
    let reason = match conn.close_reason() {
        Some(r) => Some(r),
        None => tokio::time::timeout(Duration::from_secs(2), conn.closed())
            .await
            .ok(),
    };
    let (code, reason) = match reason {
        Some(quinn::ConnectionError::ApplicationClosed(a)) => (
            a.error_code.into_inner(),
            String::from_utf8_lossy(&a.reason).into_owned(),
        ),
        Some(quinn::ConnectionError::LocallyClosed) if dead.load(Ordering::SeqCst) => {
            (0, DEAD_REASON.into())
        }
        Some(quinn::ConnectionError::LocallyClosed) => (0, "closed by this client".into()),
        Some(other) => (0, other.to_string()),
        None => (0, "stream ended".into()),
    };
    if !muted.load(Ordering::SeqCst) {
        let _ = events.send(Event::Disconnected { code, reason }).await;
    }
}
