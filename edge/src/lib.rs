//! meshchat's own QUIC endpoint loop on `quinn-proto` (issue 15).
//!
//! One task owns the QUIC endpoint ([`quinn_proto::Endpoint`]), every connection (boxed, in
//! a table indexed by the endpoint's connection handle), one transmit buffer, the receive
//! buffers of its socket (or, in a group, a queue its group's receiver fills) and the timers.
//! There is no task, channel, `Notify` or driver per connection, as quinn's async layer has
//! (a tokio unbounded channel whose first 32-slot block is allocated up front, a driver task,
//! a transmit buffer per connection: ~9.7 KB per connection measured, docs/PERFORMANCE.md
//! "Endpoint loop"). What a connection's application does is an
//! [`App`]'s business, called from the loop with a [`Cx`] to write, pause reading, set a
//! deadline or close: sans-IO, so it can be tested without a socket.
//!
//! What reaches an application:
//! - the admission decision for each new connection ([`App::admit`]: accept, Retry, refuse)
//!   before the endpoint keeps any state for it;
//! - its connection's events ([`AppEvent`]): the handshake completed, stream data (read only
//!   while the application does not pause reading, so a client that sends faster than it is
//!   served meets QUIC flow control, not a growing buffer), its deadline, a ring of its
//!   [`Bell`] from another task (a push queued, a close asked for), the result of work it
//!   started ([`App::poll_work`]), and the loop's shutdown;
//! - its end ([`App::on_closed`]), once, when the connection is lost or drained.
//!
//! The socket's I/O goes through `quinn-udp` ([`udp`]): datagrams read in batches (`recvmmsg`,
//! GRO), a connection's datagrams sent together (GSO), ECN both ways.
//!
//! Known simplifications: what the socket cannot take at once (a datagram, or the datagrams
//! of one GSO send) is dropped and left to QUIC's loss recovery; timers in a binary heap with
//! lazy deletion.

pub mod echo;
pub mod lean;
pub mod spread;
pub mod tls;
pub mod udp;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use parking_lot::Mutex;
/// The stream ids applications see (quinn-proto's).
pub use quinn_proto::StreamId;
use quinn_proto::{
    ConnectionHandle, DatagramEvent, Dir, Endpoint, EndpointConfig, Event, ServerConfig,
    StreamEvent, Transmit,
};
use tokio::net::UdpSocket;
use tokio::sync::{Notify, mpsc, watch};
use tracing::{debug, trace, warn};
use udp::{Datagram, RecvBatch, Udp};

/// `EMSGSIZE` on Linux: a datagram larger than the interface takes.
const EMSGSIZE: i32 = 90;
/// Datagrams sent by one GSO send at most (quinn's driver has the same bound).
const MAX_TRANSMIT_SEGMENTS: usize = 10;
/// Bytes one UDP send may carry (the kernel refuses a send of more than 65,507).
const MAX_UDP_SEND: usize = 65_000;
/// Datagrams a loop of a group takes from its queue per wake-up at most.
const RECV_BATCH: usize = 64;
/// Default bound on the bytes an application's writes may wait for a connection's flow-control
/// window; past it the connection is closed (a client that sends without reading).
const MAX_PENDING_BYTES: usize = 256 * 1024;
/// Application error code of a connection closed for the pending bound, by default.
const CLOSE_PENDING_FULL: u32 = 1;
/// How long a stopping loop waits for its closed connections to drain before it returns.
const DRAIN_AFTER_STOP: Duration = Duration::from_secs(2);

/// A connection's key: its slot in the loop's table and the generation that slot had when the
/// connection was accepted (a slot is reused; a stale key finds nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    slot: u32,
    generation: u32,
}

/// What the application decides for a new connection, before any state is kept for it.
pub enum Admit<T> {
    /// Accept it; `T` goes to [`App::accept`].
    Accept(T),
    /// Decide once this resolves: accept with `Some`, refuse with `None` (the application
    /// bounds the wait). Only the client's first packet is kept meanwhile.
    Later(Pin<Box<dyn Future<Output = Option<T>> + Send>>),
    /// Ask the client to prove its address first (QUIC Retry: no state kept here).
    Retry,
    /// Refuse it (CONNECTION_REFUSED).
    Refuse,
}

impl<T> std::fmt::Debug for Admit<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Admit::Accept(_) => "Accept",
            Admit::Later(_) => "Later",
            Admit::Retry => "Retry",
            Admit::Refuse => "Refuse",
        })
    }
}

/// A new connection waiting for its admission, with the client's first packet.
type Waiting<T> = Pin<Box<dyn Future<Output = (quinn_proto::Incoming, Option<T>)> + Send>>;

/// What happened to a connection, for its application.
#[derive(Debug)]
pub enum AppEvent<'a, W> {
    /// The handshake completed (data read before this was 0-RTT early data).
    Connected,
    /// `data` arrived on stream `stream`; `fin`: the peer finished (or reset) it.
    Data {
        /// The stream.
        stream: StreamId,
        /// What arrived (may be empty with `fin`).
        data: &'a [u8],
        /// The peer will send no more on it.
        fin: bool,
    },
    /// The deadline set with [`Cx::set_deadline`] passed (it is cleared).
    Timer,
    /// The connection's [`Bell`] rang.
    Wake,
    /// The peer's flow control took some of the bytes that waited for it (raised once per
    /// turn of the connection, however the bytes moved).
    Flushed,
    /// The peer will read no more of `stream` (STOP_SENDING): what waited for it is dropped.
    Stopped {
        /// The stream.
        stream: StreamId,
    },
    /// Work the application started for this connection finished ([`App::poll_work`]).
    Work(W),
    /// The loop is stopping: finish up; connections still open after the grace are closed.
    Shutdown,
}

/// What runs a connection's application protocol, called from the loop.
pub trait App {
    /// Per-connection application state, made when a connection is accepted.
    type Conn;
    /// What [`App::admit`] hands to [`App::accept`] (sent across tasks while a decision is
    /// [`Admit::Later`]).
    type Admission: Send + 'static;
    /// The result of work the application runs for a connection.
    type Work;

    /// Whether to take a new connection from `remote` (`validated`: its address was proven
    /// by a Retry token); `held`: connections the loop holds now.
    fn admit(&mut self, remote: SocketAddr, validated: bool, held: usize)
    -> Admit<Self::Admission>;

    /// A new connection's state.
    fn accept(&mut self, cx: &mut Cx<'_>, admission: Self::Admission) -> Self::Conn;

    /// Something happened on a connection.
    fn on_event(&mut self, cx: &mut Cx<'_>, conn: &mut Self::Conn, event: AppEvent<'_, Self::Work>);

    /// The connection ended (closed by either side, lost, timed out) and its state goes.
    fn on_closed(&mut self, conn: Self::Conn);

    /// Work whose connection is gone (or whose application ended) came back.
    fn orphaned(&mut self, _work: Self::Work) {}

    /// An admitted connection failed before it was made (a bad first packet, say).
    fn accept_failed(&mut self, _admission: Self::Admission) {}

    /// The application's own work (say, requests running against storage): the next result,
    /// for the connection it belongs to. Results for connections gone are dropped.
    fn poll_work(&mut self, _cx: &mut Context<'_>) -> Poll<(ConnKey, Self::Work)> {
        Poll::Pending
    }
}

/// Why the loop could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// The UDP socket failed.
    #[error("udp socket: {0}")]
    Socket(#[from] std::io::Error),
}

const QUEUED: u8 = 1;
const CLOSE_ASKED: u8 = 2;
const GONE: u8 = 4;

/// The loop's queue of connections whose bell rang. Each connection is in it at most once
/// (its [`Bell`]'s queued flag), so it holds at most as many keys as there are connections.
#[derive(Debug, Default)]
struct Rung {
    keys: Mutex<Vec<ConnKey>>,
    notify: Notify,
}

/// A handle on one connection for other tasks: ring it (the application gets
/// [`AppEvent::Wake`]) or close it. Cheap to clone as an `Arc`; stays valid (and harmless)
/// after the connection is gone.
#[derive(Debug)]
pub struct Bell {
    key: ConnKey,
    state: AtomicU8,
    /// The close asked for (boxed: a bell lives as long as its connection, a close rarely).
    close: Mutex<Option<Box<(u32, Bytes)>>>,
    rung: Arc<Rung>,
}

impl Bell {
    /// Wakes the connection's application in the loop (coalesced: rings before the loop gets
    /// to it make one wake).
    pub fn ring(&self) {
        let before = self.state.fetch_or(QUEUED, Ordering::AcqRel);
        if before & (QUEUED | GONE) == 0 {
            self.rung.keys.lock().push(self.key);
            self.rung.notify.notify_one();
        }
    }

    /// Closes the connection with application error `code` and `reason` (the first close
    /// asked for wins).
    pub fn close(&self, code: u32, reason: &[u8]) {
        {
            let mut c = self.close.lock();
            if c.is_some() || self.is_closed() {
                return;
            }
            *c = Some(Box::new((code, Bytes::copy_from_slice(reason))));
        }
        self.state.fetch_or(CLOSE_ASKED, Ordering::AcqRel);
        self.ring();
    }

    /// Whether a close was asked for or the connection is gone.
    pub fn is_closed(&self) -> bool {
        self.state.load(Ordering::Acquire) & (CLOSE_ASKED | GONE) != 0
    }
}

/// What the loop keeps per connection besides the application's state.
struct Io {
    conn: quinn_proto::Connection,
    key: ConnKey,
    bell: Arc<Bell>,
    /// What only a busy or closing connection needs (`None` for an idle one: what it saves
    /// counts at 100k connections).
    cold: Option<Box<Cold>>,
    /// The application's deadline.
    app_deadline: Option<Instant>,
    /// The application does not read now (streams that became readable meanwhile: `cold`).
    paused: bool,
    /// When its live heap entry fires and the number that marks it (older entries are stale).
    queued: Option<Instant>,
    timer: u64,
    /// Waiting bytes the peer's flow control took since the application last heard of it.
    moved: usize,
}

/// A close after the stream's data is acknowledged: stream, code, reason, at the latest.
type Linger = (StreamId, u32, Bytes, Instant);

/// An application's bound on a connection's waiting bytes: bytes, close code, reason.
type Limit = (usize, u32, &'static [u8]);

/// A connection's state that is empty while it is idle, boxed apart.
#[derive(Default)]
struct Cold {
    /// Writes waiting for the peer's flow-control window: stream, bytes, finish after them.
    pending: Vec<(StreamId, Vec<u8>, bool)>,
    /// Streams that became readable while the application did not read.
    unread: Vec<StreamId>,
    linger: Option<Linger>,
}

impl Io {
    /// The cold state, made when first needed.
    fn cold(&mut self) -> &mut Cold {
        self.cold.get_or_insert_with(Box::default)
    }

    /// Lets go of the cold state once it holds nothing.
    fn tidy(&mut self) {
        if self
            .cold
            .as_deref()
            .is_some_and(|c| c.pending.is_empty() && c.unread.is_empty() && c.linger.is_none())
        {
            self.cold = None;
        }
    }

    /// What waits for stream `stream`.
    fn waiting(&mut self, stream: StreamId) -> Option<&mut (StreamId, Vec<u8>, bool)> {
        self.cold
            .as_deref_mut()?
            .pending
            .iter_mut()
            .find(|p| p.0 == stream)
    }

    fn linger(&self) -> Option<&Linger> {
        self.cold.as_deref()?.linger.as_ref()
    }

    fn set_linger(&mut self, linger: Option<Linger>) {
        match linger {
            Some(l) => self.cold().linger = Some(l),
            None => {
                if let Some(c) = self.cold.as_deref_mut() {
                    c.linger = None;
                }
                self.tidy();
            }
        }
    }

    /// Stream `id` is to be read once the application reads again.
    fn mark_unread(&mut self, id: StreamId) {
        let unread = &mut self.cold().unread;
        if !unread.contains(&id) {
            unread.push(id);
        }
    }

    /// The streams to read now that the application reads again.
    fn take_unread(&mut self) -> Vec<StreamId> {
        let unread = self
            .cold
            .as_deref_mut()
            .map(|c| std::mem::take(&mut c.unread))
            .unwrap_or_default();
        self.tidy();
        unread
    }
}

/// One connection as the loop keeps it.
struct Entry<C> {
    io: Io,
    /// Taken when the connection is lost (the rest stays until it drains).
    app: Option<C>,
}

/// A connection's I/O as its application sees it in a callback.
pub struct Cx<'a> {
    io: &'a mut Io,
    now: Instant,
    limit: Limit,
}

impl Cx<'_> {
    /// The connection's key (for work results).
    pub fn key(&self) -> ConnKey {
        self.io.key
    }

    /// The instant the loop is serving.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// The client's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.io.conn.remote_address()
    }

    /// Whether the handshake is still in progress (data read now is 0-RTT early data).
    pub fn is_handshaking(&self) -> bool {
        self.io.conn.is_handshaking()
    }

    /// The connection's bell, for other tasks.
    pub fn bell(&self) -> Arc<Bell> {
        self.io.bell.clone()
    }

    /// Writes `data` to `stream` (in order, as the peer's flow control allows). Past the
    /// loop's pending bound the connection is closed with the bound's code.
    pub fn write(&mut self, stream: StreamId, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let io = &mut *self.io;
        match io.waiting(stream) {
            // Behind what already waits: in order.
            Some(p) => {
                p.1.extend_from_slice(data);
                flush(io, stream);
            }
            // Straight to the stream; only what flow control does not take now waits.
            None => {
                if let Some(written) = write_some(&mut io.conn, stream, data)
                    && written < data.len()
                {
                    io.cold()
                        .pending
                        .push((stream, data[written..].to_vec(), false));
                }
            }
        }
        let waiting = self.pending_bytes();
        let (limit, code, reason) = self.limit;
        if waiting > limit {
            debug!(waiting, "writes not read by the peer: connection closed");
            self.close(code, reason);
        }
    }

    /// Finishes `stream` once what waits for it is written.
    pub fn finish(&mut self, stream: StreamId) {
        let io = &mut *self.io;
        match io.waiting(stream) {
            Some(p) => p.2 = true,
            None => {
                let _ = io.conn.send_stream(stream).finish();
            }
        }
        flush(io, stream);
    }

    /// Bytes written and not yet taken by the peer's flow control.
    pub fn pending_bytes(&self) -> usize {
        self.io
            .cold
            .as_deref()
            .map_or(0, |c| c.pending.iter().map(|p| p.1.len()).sum())
    }

    /// Stops reading: data stays with QUIC (and the peer meets its flow-control window).
    pub fn pause_reading(&mut self) {
        self.io.paused = true;
    }

    /// Reads again; what arrived meanwhile is delivered after this callback.
    pub fn resume_reading(&mut self) {
        self.io.paused = false;
    }

    /// Sets (or clears) the application's deadline: [`AppEvent::Timer`] when it passes.
    pub fn set_deadline(&mut self, at: Option<Instant>) {
        self.io.app_deadline = at;
    }

    /// Closes the connection now with application error `code`.
    pub fn close(&mut self, code: u32, reason: &[u8]) {
        self.io.set_linger(None);
        self.io
            .conn
            .close(self.now, code.into(), Bytes::copy_from_slice(reason));
    }

    /// Finishes `stream` and closes the connection with `code` once the peer acknowledged
    /// everything written to it, or after `linger` (a QUIC close discards unacknowledged
    /// stream data, and the last bytes written often explain the close).
    pub fn close_after_flush(
        &mut self,
        stream: StreamId,
        code: u32,
        reason: &[u8],
        linger: Duration,
    ) {
        self.finish(stream);
        self.io.set_linger(Some((
            stream,
            code,
            Bytes::copy_from_slice(reason),
            self.now + linger,
        )));
    }
}

/// Counters of the loop, for tests and measurements.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EdgeStats {
    /// Connections held now.
    pub connections: usize,
    /// Connections accepted since start.
    pub accepted: u64,
    /// Datagrams the socket would not take at once (dropped; QUIC resends).
    pub send_dropped: u64,
    /// Datagrams a send failed for otherwise (dropped too; an error the kernel returned, such
    /// as a GSO send it refused).
    pub send_failed: u64,
}

/// Commands to a running loop.
enum Command {
    /// New connections are made with this config; `None` refuses them.
    ServerConfig(Option<Arc<ServerConfig>>),
}

/// A handle on a running loop from other tasks.
#[derive(Debug, Clone)]
pub struct EdgeControl {
    commands: mpsc::Sender<Command>,
    local_addr: Option<SocketAddr>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::ServerConfig(c) => write!(f, "ServerConfig(set: {})", c.is_some()),
        }
    }
}

impl EdgeControl {
    /// Replaces the config new connections are made with (`None`: refuse them). Connections
    /// held keep theirs. `false` when the loop has stopped or has 16 commands waiting.
    pub fn set_server_config(&self, config: Option<Arc<ServerConfig>>) -> bool {
        self.commands
            .try_send(Command::ServerConfig(config))
            .is_ok()
    }

    /// The address the loop's socket is bound to, when known.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }
}

/// The endpoint loop: see the module docs.
pub struct Edge<A: App> {
    endpoint: Endpoint,
    server: Option<Arc<ServerConfig>>,
    conns: Vec<Option<Box<Entry<A::Conn>>>>,
    generation: u32,
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    next_timer: u64,
    app: A,
    /// New connections whose admission is decided later.
    waiting: futures::stream::FuturesUnordered<Waiting<A::Admission>>,
    rung: Arc<Rung>,
    commands: mpsc::Receiver<Command>,
    control: mpsc::Sender<Command>,
    /// The one transmit buffer: every datagram (or GSO run of them) is built here and sent
    /// before the next.
    tx: Vec<u8>,
    limit: Limit,
    /// Connections held by this loop and the others of its group.
    held: Arc<AtomicUsize>,
    grace: Duration,
    stop_close: (u32, &'static [u8]),
    stats: EdgeStats,
    stats_tx: watch::Sender<EdgeStats>,
    /// How this loop's own reads of its socket go (a lone loop's; a group's receiver has its
    /// own).
    recv_health: Arc<udp::RecvHealth>,
}

/// What woke the loop.
enum Wakeup<W, A> {
    /// A datagram from the group's receiver, or (`None`) a batch read from the socket.
    Datagram(std::io::Result<Option<Datagram>>),
    Rung,
    Work(ConnKey, W),
    Admitted(Box<quinn_proto::Incoming>, Option<A>),
    Timer,
    Command(Option<Command>),
    Stop,
}

impl<A: App> Edge<A> {
    /// A loop serving `server` and running `app` on each connection.
    pub fn new(server: Arc<ServerConfig>, app: A) -> Self {
        let (control, commands) = mpsc::channel(16);
        Self {
            endpoint: Endpoint::new(
                Arc::new(EndpointConfig::default()),
                Some(server.clone()),
                false,
                None,
            ),
            server: Some(server),
            conns: Vec::new(),
            generation: 0,
            timers: BinaryHeap::new(),
            next_timer: 0,
            app,
            waiting: futures::stream::FuturesUnordered::new(),
            rung: Arc::default(),
            commands,
            control,
            tx: Vec::new(),
            limit: (
                MAX_PENDING_BYTES,
                CLOSE_PENDING_FULL,
                b"writes not read by the peer",
            ),
            held: Arc::default(),
            grace: Duration::from_secs(5),
            stop_close: (0, b"server stopping"),
            stats: EdgeStats::default(),
            stats_tx: watch::channel(EdgeStats::default()).0,
            recv_health: Arc::default(),
        }
    }

    /// Reports how this loop's reads of its socket go to `health` ([`Edge::run`]: a loop of a
    /// group reads nothing itself, its group's receiver does, [`spread::dispatch`]).
    pub fn with_recv_health(mut self, health: Arc<udp::RecvHealth>) -> Self {
        self.recv_health = health;
        self
    }

    /// Bytes of writes a connection may have waiting for the peer before it is closed with
    /// application error `code` and `reason` (default 256 KiB, code 1).
    pub fn with_pending_limit(mut self, bytes: usize, code: u32, reason: &'static [u8]) -> Self {
        self.limit = (bytes, code, reason);
        self
    }

    /// How long connections have to finish once the loop is told to stop (default 5 s);
    /// those still open then are closed with application error `code` and `reason`.
    pub fn with_shutdown(mut self, grace: Duration, code: u32, reason: &'static [u8]) -> Self {
        self.grace = grace;
        self.stop_close = (code, reason);
        self
    }

    /// The loop's counters, updated as it runs.
    pub fn stats(&self) -> watch::Receiver<EdgeStats> {
        self.stats_tx.subscribe()
    }

    /// A handle to command the loop once it runs on `local_addr`.
    pub fn control(&self, local_addr: Option<SocketAddr>) -> EdgeControl {
        EdgeControl {
            commands: self.control.clone(),
            local_addr,
        }
    }

    /// Makes this loop number `index` of a group sharing one socket (see [`spread`]): the
    /// connection ids it issues name it, and `held` counts the group's connections (what
    /// [`App::admit`] is told). Before [`Edge::run_fed`].
    pub fn in_group(mut self, index: u8, held: Arc<AtomicUsize>) -> Self {
        let mut config = EndpointConfig::default();
        config.cid_generator(move || Box::new(spread::LoopCids::new(index)));
        self.endpoint = Endpoint::new(Arc::new(config), self.server.clone(), false, None);
        self.held = held;
        self
    }

    /// Serves `socket` until `stop` turns true, then gives connections the shutdown grace,
    /// closes what is left and returns once they drained (or after 2 s more).
    pub async fn run(
        self,
        socket: UdpSocket,
        stop: watch::Receiver<bool>,
    ) -> Result<(), EdgeError> {
        let udp = Udp::new(socket)?;
        self.serve(&udp, None, stop).await
    }

    /// As [`Edge::run`] for a loop of a group: its datagrams come from `datagrams` (the
    /// group's receiver, [`spread::dispatch`]); it sends on the group's socket `udp` itself.
    pub async fn run_fed(
        self,
        udp: Arc<Udp>,
        datagrams: mpsc::Receiver<Datagram>,
        stop: watch::Receiver<bool>,
    ) -> Result<(), EdgeError> {
        self.serve(&udp, Some(datagrams), stop).await
    }

    async fn serve(
        mut self,
        socket: &Udp,
        mut fed: Option<mpsc::Receiver<Datagram>>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), EdgeError> {
        // A loop that reads the socket itself reads it in batches.
        let mut rx = fed
            .is_none()
            .then(|| RecvBatch::new(self.recv_health.clone()));
        // Once stopping: until when connections may finish, then until when they drain.
        let mut stopping: Option<(Instant, bool)> = None;
        let rung = self.rung.clone();
        loop {
            if stopping.is_some() && self.stats.connections == 0 {
                break;
            }
            let deadline = self.next_deadline();
            let until = match (deadline, stopping) {
                (Some(d), Some((s, _))) => Some(d.min(s)),
                (d, s) => d.or(s.map(|s| s.0)),
            };
            let wakeup = {
                let app = &mut self.app;
                let commands = &mut self.commands;
                let waiting = &mut self.waiting;
                let sleep = async {
                    match until {
                        Some(at) => tokio::time::sleep_until(at.into()).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    received = next_datagram(socket, &mut rx, &mut fed) => Wakeup::Datagram(received),
                    () = rung.notify.notified() => Wakeup::Rung,
                    (key, work) = std::future::poll_fn(|cx| app.poll_work(cx)) => Wakeup::Work(key, work),
                    Some((incoming, admission)) = waiting.next(), if !waiting.is_empty() => {
                        Wakeup::Admitted(Box::new(incoming), admission)
                    }
                    () = sleep => Wakeup::Timer,
                    cmd = commands.recv() => Wakeup::Command(cmd),
                    _ = stop.changed(), if stopping.is_none() => Wakeup::Stop,
                }
            };
            let now = Instant::now();
            match wakeup {
                Wakeup::Datagram(Ok(Some(d))) => {
                    self.datagram(socket, now, d);
                    // What else is queued, without a turn of the loop per datagram (bounded,
                    // so timers and other wake-ups are not starved).
                    for _ in 1..RECV_BATCH {
                        let Some(d) = fed.as_mut().and_then(|f| f.try_recv().ok()) else {
                            break;
                        };
                        self.datagram(socket, Instant::now(), d);
                    }
                }
                Wakeup::Datagram(Ok(None)) => {
                    if let Some(batch) = rx.as_ref() {
                        for (meta, data) in batch.datagrams() {
                            let d = Datagram::new(meta, data);
                            self.datagram(socket, Instant::now(), d);
                        }
                    }
                }
                // An ICMP error reported on the socket, say: the loop goes on.
                Wakeup::Datagram(Err(e)) if udp::is_icmp_report(&e) => {
                    debug!(error = %e, "recv failed");
                }
                // The batch waits before it reads again (`RecvBatch::recv`).
                Wakeup::Datagram(Err(e)) => {
                    let errors = rx.as_ref().map_or(1, RecvBatch::errors);
                    if errors.is_power_of_two() {
                        warn!(error = %e, errors, "recv failed");
                    } else {
                        debug!(error = %e, "recv failed");
                    }
                }
                Wakeup::Rung => self.rung(socket, now),
                Wakeup::Admitted(incoming, Some(admission)) => {
                    self.accept(socket, now, *incoming, admission);
                }
                Wakeup::Admitted(incoming, None) => self.refuse(socket, *incoming),
                Wakeup::Work(key, work) => {
                    let live = self
                        .entry(key.slot as usize)
                        .is_some_and(|e| e.io.key == key && e.app.is_some());
                    if live {
                        self.with_app(socket, key, now, |app, cx, c| {
                            app.on_event(cx, c, AppEvent::Work(work));
                        });
                    } else {
                        self.app.orphaned(work);
                    }
                }
                Wakeup::Timer => {
                    self.expire(socket, now);
                    match stopping {
                        Some((at, false)) if at <= now => {
                            self.close_all(socket, now);
                            stopping = Some((now + DRAIN_AFTER_STOP, true));
                        }
                        Some((at, true)) if at <= now => break,
                        _ => {}
                    }
                }
                // Stopping: new connections stay refused, whatever a reload asks.
                Wakeup::Command(Some(Command::ServerConfig(_))) if stopping.is_some() => {}
                Wakeup::Command(Some(Command::ServerConfig(config))) => {
                    self.endpoint.set_server_config(config.clone());
                    self.server = config;
                }
                Wakeup::Command(None) => {}
                Wakeup::Stop => {
                    // No new connections; those held hear of it and get the grace.
                    self.endpoint.set_server_config(None);
                    self.server = None;
                    stopping = Some((now + self.grace, false));
                    for slot in 0..self.conns.len() {
                        if let Some(key) = self.entry(slot).map(|e| e.io.key) {
                            self.with_app(socket, key, now, |app, cx, c| {
                                app.on_event(cx, c, AppEvent::Shutdown);
                            });
                        }
                    }
                }
            }
            self.publish();
        }
        Ok(())
    }

    fn publish(&mut self) {
        if *self.stats_tx.borrow() != self.stats {
            self.stats_tx.send_replace(self.stats);
        }
    }

    /// Closes every connection still open (the shutdown grace is over).
    fn close_all(&mut self, socket: &Udp, now: Instant) {
        for slot in 0..self.conns.len() {
            let stop_close = self.stop_close;
            let Some(e) = self.entry(slot) else { continue };
            let key = e.io.key;
            if !e.io.conn.is_closed() {
                let (code, reason) = stop_close;
                e.io.set_linger(None);
                e.io.conn
                    .close(now, code.into(), Bytes::from_static(reason));
            }
            self.drive(socket, key.slot as usize, now);
        }
    }

    /// The earliest live deadline, dropping stale heap entries on the way.
    fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(Reverse((at, handle, timer))) = self.timers.peek().copied() {
            match self.entry(handle) {
                Some(e) if e.io.timer == timer => return Some(at),
                _ => {
                    self.timers.pop();
                }
            }
        }
        None
    }

    fn entry(&mut self, handle: usize) -> Option<&mut Entry<A::Conn>> {
        self.conns.get_mut(handle).and_then(|e| e.as_deref_mut())
    }

    /// Runs the application callback `f` on the connection `key` (when it is still there and
    /// its application has not ended), then brings the connection up to date.
    fn with_app(
        &mut self,
        socket: &Udp,
        key: ConnKey,
        now: Instant,
        f: impl FnOnce(&mut A, &mut Cx<'_>, &mut A::Conn),
    ) {
        let slot = key.slot as usize;
        let Some(e) = self.conns.get_mut(slot).and_then(|e| e.as_deref_mut()) else {
            return;
        };
        if e.io.key != key {
            return;
        }
        if let Some(c) = e.app.as_mut() {
            let mut cx = Cx {
                io: &mut e.io,
                now,
                limit: self.limit,
            };
            f(&mut self.app, &mut cx, c);
        }
        self.drive(socket, slot, now);
    }

    /// The connections whose bell rang: a close asked for is applied, the application woken.
    fn rung(&mut self, socket: &Udp, now: Instant) {
        let keys = std::mem::take(&mut *self.rung.keys.lock());
        for key in keys {
            let Some(e) = self.entry(key.slot as usize) else {
                continue;
            };
            if e.io.key != key {
                continue;
            }
            // Cleared before the application looks: a ring from now on queues it again.
            let before = e.io.bell.state.fetch_and(!QUEUED, Ordering::AcqRel);
            let asked = if before & CLOSE_ASKED != 0 {
                e.io.bell.close.lock().take()
            } else {
                None
            };
            if let Some((code, reason)) = asked.map(|a| *a) {
                e.io.set_linger(None);
                e.io.conn.close(now, code.into(), reason);
                // Nothing more to write: the application ends in `drive`.
                self.drive(socket, key.slot as usize, now);
                continue;
            }
            self.with_app(socket, key, now, |app, cx, c| {
                app.on_event(cx, c, AppEvent::Wake);
            });
        }
    }

    /// Runs the timeouts due at `now` (the connection's, the application's, a linger's): the
    /// heap entries due now are taken first, so a deadline set again in the past is served
    /// at the next turn of the loop, not in a spin here.
    fn expire(&mut self, socket: &Udp, now: Instant) {
        let mut due = Vec::new();
        while let Some(Reverse((at, handle, timer))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            due.push((handle, timer));
        }
        for (handle, timer) in due {
            let Some(e) = self.entry(handle) else {
                continue;
            };
            if e.io.timer != timer {
                continue;
            }
            e.io.queued = None;
            if e.io.conn.poll_timeout().is_some_and(|t| t <= now) {
                e.io.conn.handle_timeout(now);
            }
            if let Some((_, code, reason, at)) = e.io.linger()
                && *at <= now
            {
                let (code, reason) = (*code, reason.clone());
                e.io.set_linger(None);
                e.io.conn.close(now, code.into(), reason);
            }
            let key = e.io.key;
            if e.io.app_deadline.is_some_and(|t| t <= now) {
                e.io.app_deadline = None;
                self.with_app(socket, key, now, |app, cx, c| {
                    app.on_event(cx, c, AppEvent::Timer);
                });
            } else {
                self.drive(socket, handle, now);
            }
        }
    }

    /// One datagram.
    fn datagram(&mut self, socket: &Udp, now: Instant, d: Datagram) {
        // quinn-proto writes a response it makes itself from the start of an empty buffer.
        self.tx.clear();
        let event = self
            .endpoint
            .handle(now, d.from, d.local_ip, d.ecn, d.data, &mut self.tx);
        match event {
            Some(DatagramEvent::ConnectionEvent(handle, event)) => {
                if let Some(e) = self.entry(handle.0) {
                    e.io.conn.handle_event(event);
                    self.drive(socket, handle.0, now);
                }
            }
            Some(DatagramEvent::NewConnection(incoming)) => self.incoming(socket, now, incoming),
            Some(DatagramEvent::Response(t)) => self.send(socket, &t),
            None => {}
        }
    }

    /// A new connection: admitted by the application, or asked to Retry, or refused.
    fn incoming(&mut self, socket: &Udp, now: Instant, incoming: quinn_proto::Incoming) {
        let remote = incoming.remote_address();
        if self.server.is_none() {
            self.refuse(socket, incoming);
            return;
        }
        let admission = match self.app.admit(
            remote,
            incoming.remote_address_validated(),
            self.held.load(Ordering::Relaxed) + self.waiting.len(),
        ) {
            Admit::Accept(a) => a,
            Admit::Later(decision) => {
                self.waiting
                    .push(Box::pin(async move { (incoming, decision.await) }));
                return;
            }
            Admit::Retry => {
                self.tx.clear();
                match self.endpoint.retry(incoming, &mut self.tx) {
                    Ok(t) => self.send(socket, &t),
                    // Already validated: nothing more to ask; dropped.
                    Err(e) => self.endpoint.ignore(e.into_incoming()),
                }
                return;
            }
            Admit::Refuse => {
                self.refuse(socket, incoming);
                return;
            }
        };
        self.accept(socket, now, incoming, admission);
    }

    /// Refuses a new connection (CONNECTION_REFUSED).
    fn refuse(&mut self, socket: &Udp, incoming: quinn_proto::Incoming) {
        self.tx.clear();
        let t = self.endpoint.refuse(incoming, &mut self.tx);
        self.send(socket, &t);
    }

    /// Accepts a new connection the application admitted.
    fn accept(
        &mut self,
        socket: &Udp,
        now: Instant,
        incoming: quinn_proto::Incoming,
        admission: A::Admission,
    ) {
        let remote = incoming.remote_address();
        // Stopping meanwhile: no new connections.
        let Some(server) = self.server.clone() else {
            self.app.accept_failed(admission);
            self.refuse(socket, incoming);
            return;
        };
        self.tx.clear();
        match self
            .endpoint
            .accept(incoming, now, &mut self.tx, Some(server))
        {
            Ok((handle, conn)) => {
                let slot = handle.0;
                self.generation = self.generation.wrapping_add(1);
                let key = ConnKey {
                    slot: slot as u32,
                    generation: self.generation,
                };
                if self.conns.len() <= slot {
                    self.conns.resize_with(slot + 1, || None);
                }
                let bell = Arc::new(Bell {
                    key,
                    state: AtomicU8::new(0),
                    close: Mutex::new(None),
                    rung: self.rung.clone(),
                });
                let mut io = Io {
                    conn,
                    key,
                    bell,
                    cold: None,
                    app_deadline: None,
                    paused: false,
                    queued: None,
                    timer: 0,
                    moved: 0,
                };
                let app = self.app.accept(
                    &mut Cx {
                        io: &mut io,
                        now,
                        limit: self.limit,
                    },
                    admission,
                );
                self.conns[slot] = Some(Box::new(Entry { io, app: Some(app) }));
                self.stats.connections += 1;
                self.held.fetch_add(1, Ordering::Relaxed);
                self.stats.accepted += 1;
                trace!(%remote, handle = slot, "connection accepted");
                self.drive(socket, slot, now);
            }
            Err(e) => {
                debug!(%remote, error = %e.cause, "connection refused");
                self.app.accept_failed(admission);
                if let Some(t) = e.response {
                    self.send(socket, &t);
                }
            }
        }
    }

    /// Sends the datagram(s) in the transmit buffer; what the socket cannot take now is
    /// dropped.
    fn send(&mut self, socket: &Udp, t: &Transmit) {
        let datagrams = t
            .segment_size
            .map_or(1, |s| t.size.div_ceil(s.max(1)))
            .max(1) as u64;
        match socket.try_send(t, &self.tx[..t.size]) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                self.stats.send_dropped += datagrams;
            }
            // An MTU probe larger than the path takes (with `mtu_discovery` on): expected,
            // and quinn-proto learns from its loss.
            Err(e) if t.segment_size.is_none() && e.raw_os_error() == Some(EMSGSIZE) => {
                debug!(to = %t.destination, size = t.size, "datagram larger than the path: dropped");
            }
            Err(e) => {
                let before = self.stats.send_failed;
                self.stats.send_failed += datagrams;
                // Every failure at debug; at warn when the count passes a power of two.
                if (before + datagrams).ilog2() != before.checked_ilog2().unwrap_or(u32::MAX) {
                    warn!(to = %t.destination, error = %e, failed = self.stats.send_failed, "send failed");
                } else {
                    debug!(to = %t.destination, error = %e, "send failed");
                }
            }
        }
    }

    /// Brings connection `handle` up to date after something happened to it: its events for
    /// the endpoint, its application events, its datagrams, its next deadline; and removes it
    /// once it is drained.
    fn drive(&mut self, socket: &Udp, handle: usize, now: Instant) {
        let Some(mut entry) = self.conns.get_mut(handle).and_then(Option::take) else {
            return;
        };
        let e = &mut *entry;
        while let Some(event) = e.io.conn.poll_endpoint_events() {
            if let Some(back) = self.endpoint.handle_event(ConnectionHandle(handle), event) {
                e.io.conn.handle_event(back);
            }
        }
        while let Some(event) = e.io.conn.poll() {
            match event {
                Event::Connected => {
                    if let Some(c) = e.app.as_mut() {
                        self.app.on_event(
                            &mut Cx {
                                io: &mut e.io,
                                now,
                                limit: self.limit,
                            },
                            c,
                            AppEvent::Connected,
                        );
                    }
                }
                Event::Stream(StreamEvent::Opened { dir: Dir::Bi }) => {
                    while let Some(id) = e.io.conn.streams().accept(Dir::Bi) {
                        self.read(e, id, now);
                    }
                }
                Event::Stream(StreamEvent::Readable { id }) => self.read(e, id, now),
                Event::Stream(StreamEvent::Writable { id }) => flush(&mut e.io, id),
                // The peer will read no more of it: what waits for it goes.
                Event::Stream(StreamEvent::Stopped { id, .. }) => {
                    if let Some(c) = e.io.cold.as_deref_mut() {
                        c.pending.retain(|p| p.0 != id);
                    }
                    e.io.tidy();
                    self.linger_done(e, id, now);
                    if let Some(c) = e.app.as_mut() {
                        let stopped = AppEvent::Stopped { stream: id };
                        self.app.on_event(
                            &mut Cx {
                                io: &mut e.io,
                                now,
                                limit: self.limit,
                            },
                            c,
                            stopped,
                        );
                    }
                }
                // All written to it was acknowledged.
                Event::Stream(StreamEvent::Finished { id }) => self.linger_done(e, id, now),
                Event::ConnectionLost { reason } => {
                    trace!(handle, %reason, "connection lost");
                    self.gone(e);
                }
                _ => {}
            }
        }
        // Waiting bytes moved (on `Writable`, or flushed ahead of a callback's write): the
        // application hears of it once, whatever raised it.
        if e.io.moved > 0 {
            e.io.moved = 0;
            if let Some(c) = e.app.as_mut() {
                self.app.on_event(
                    &mut Cx {
                        io: &mut e.io,
                        now,
                        limit: self.limit,
                    },
                    c,
                    AppEvent::Flushed,
                );
            }
        }
        // Reading resumed by a callback: what arrived meanwhile.
        if !e.io.paused && e.io.cold.as_deref().is_some_and(|c| !c.unread.is_empty()) {
            for id in e.io.take_unread() {
                self.read(e, id, now);
            }
        }
        // Closed here (by the application, a bell, the pending bound, a linger's end) or by
        // the peer: nothing more reaches the application, which ends now rather than when
        // the connection drains (3 PTO later).
        if e.io.conn.is_closed() {
            self.gone(e);
        }
        loop {
            self.tx.clear();
            // Several datagrams at once when the connection has them (GSO), as many as one
            // UDP send carries (64 KiB: the kernel refuses more, losing them all) and no more
            // than quinn's driver sends at once.
            let mtu = usize::from(e.io.conn.current_mtu()).max(1);
            let segments = socket
                .max_gso_segments()
                .min(MAX_TRANSMIT_SEGMENTS)
                .min(MAX_UDP_SEND / mtu)
                .max(1);
            let Some(t) = e.io.conn.poll_transmit(now, segments, &mut self.tx) else {
                break;
            };
            self.send(socket, &t);
        }
        // As quinn's driver, events queued since the first pass go to the endpoint before the
        // connection can be dropped (its `Drained` must reach the endpoint, or the endpoint
        // keeps the handle).
        while let Some(event) = e.io.conn.poll_endpoint_events() {
            if let Some(back) = self.endpoint.handle_event(ConnectionHandle(handle), event) {
                e.io.conn.handle_event(back);
            }
        }
        if e.io.conn.is_drained() {
            self.gone(e);
            self.stats.connections -= 1;
            self.held.fetch_sub(1, Ordering::Relaxed);
            trace!(handle, "connection drained");
            return;
        }
        // A deadline earlier than the queued entry gets a new entry; a later one waits for the
        // queued entry to fire and re-arm (`expire`): a busy connection's idle deadline, which
        // moves with every packet, does not fill the heap.
        let deadline = [
            e.io.conn.poll_timeout(),
            e.io.app_deadline,
            e.io.linger().map(|l| l.3),
        ]
        .into_iter()
        .flatten()
        .min();
        if let Some(at) = deadline
            && e.io.queued.is_none_or(|q| at < q)
        {
            self.next_timer += 1;
            e.io.timer = self.next_timer;
            e.io.queued = Some(at);
            self.timers.push(Reverse((at, handle, e.io.timer)));
        }
        self.conns[handle] = Some(entry);
        // Entries made stale by deadlines that moved earlier leave the heap when they come
        // due; a long idle deadline under many short ones could keep them for a minute: past
        // twice the live entries, the heap is rebuilt from the live ones.
        if self.timers.len() > 2 * self.stats.connections + 1024 {
            let conns = &self.conns;
            self.timers.retain(|Reverse((_, h, id))| {
                conns
                    .get(*h)
                    .and_then(|e| e.as_deref())
                    .is_some_and(|e| e.io.timer == *id)
            });
        }
    }

    /// The connection is lost: its application ends (once), its bell goes quiet.
    fn gone(&mut self, e: &mut Entry<A::Conn>) {
        e.io.bell.state.fetch_or(GONE, Ordering::AcqRel);
        if let Some(c) = e.app.take() {
            self.app.on_closed(c);
        }
    }

    /// A lingering close waits for stream `id`: it is done with.
    fn linger_done(&mut self, e: &mut Entry<A::Conn>, id: StreamId, now: Instant) {
        if let Some((stream, code, reason, _)) = e.io.linger()
            && *stream == id
        {
            let (code, reason) = (*code, reason.clone());
            e.io.set_linger(None);
            e.io.conn.close(now, code.into(), reason);
        }
    }

    /// Reads what stream `id` has, chunk by chunk, and hands it to the application until it
    /// pauses reading.
    fn read(&mut self, e: &mut Entry<A::Conn>, id: StreamId, now: Instant) {
        if e.io.paused {
            e.io.mark_unread(id);
            return;
        }
        let Some(c) = e.app.as_mut() else { return };
        loop {
            // Stream data still queued in a connection closed meanwhile goes nowhere.
            if e.io.conn.is_closed() {
                return;
            }
            let mut recv = e.io.conn.recv_stream(id);
            let Ok(mut chunks) = recv.read(true) else {
                return;
            };
            let (chunk, fin) = match chunks.next(usize::MAX) {
                Ok(Some(chunk)) => (Some(chunk.bytes), false),
                Ok(None) => (None, true),
                // Reset by the peer: the end of what it sends.
                Err(quinn_proto::ReadError::Reset(_)) => (None, true),
                Err(quinn_proto::ReadError::Blocked) => (None, false),
            };
            // Whether the peer's flow-control credit must be sent is the connection's business
            // (it queues the frame); the return value says so.
            let _ = chunks.finalize();
            if chunk.is_none() && !fin {
                return;
            }
            let data = chunk.unwrap_or_default();
            self.app.on_event(
                &mut Cx {
                    io: &mut e.io,
                    now,
                    limit: self.limit,
                },
                c,
                AppEvent::Data {
                    stream: id,
                    data: &data,
                    fin,
                },
            );
            if fin {
                return;
            }
            if e.io.paused {
                e.io.mark_unread(id);
                return;
            }
        }
    }
}

/// The next datagram from the group's receiver (`fed`; once that is gone, none ever again),
/// or else (`None`) the next batch read from the socket into `rx`.
async fn next_datagram(
    socket: &Udp,
    rx: &mut Option<RecvBatch>,
    fed: &mut Option<mpsc::Receiver<Datagram>>,
) -> std::io::Result<Option<Datagram>> {
    match (fed, rx) {
        (Some(f), _) => match f.recv().await {
            Some(d) => Ok(Some(d)),
            None => std::future::pending().await,
        },
        (None, Some(rx)) => rx.recv(socket).await.map(|()| None),
        (None, None) => std::future::pending().await,
    }
}

/// Writes as much of `data` to stream `id` as flow control takes now: how much, or `None` when
/// the stream takes nothing more (stopped or reset by the peer, or closed). Until all is
/// written or a write says `Blocked`: quinn-proto raises `Writable` later only for a stream
/// whose write was refused whole (one cut short by the connection's window would never hear
/// of more room).
fn write_some(conn: &mut quinn_proto::Connection, id: StreamId, data: &[u8]) -> Option<usize> {
    let mut written = 0;
    while written < data.len() {
        match conn.send_stream(id).write(&data[written..]) {
            Ok(0) | Err(quinn_proto::WriteError::Blocked) => break,
            Ok(n) => written += n,
            Err(_) => return None,
        }
    }
    Some(written)
}

/// Writes what waits for stream `id` as far as flow control allows; finishes the stream once
/// all of it is written if asked.
fn flush(io: &mut Io, id: StreamId) {
    let Some(cold) = io.cold.as_deref_mut() else {
        return;
    };
    let Some(at) = cold.pending.iter().position(|p| p.0 == id) else {
        return;
    };
    let (_, data, fin) = &mut cold.pending[at];
    let Some(written) = write_some(&mut io.conn, id, data) else {
        cold.pending.swap_remove(at);
        io.tidy();
        return;
    };
    data.drain(..written);
    io.moved += written;
    if data.is_empty() {
        let fin = *fin;
        cold.pending.swap_remove(at);
        if fin {
            let _ = io.conn.send_stream(id).finish();
        }
        // An idle connection keeps no allocation here.
        io.tidy();
    }
}
