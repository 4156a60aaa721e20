//! meshchat's own QUIC endpoint loop on `quinn-proto` (issue 15, its first part).
//!
//! One task owns the QUIC endpoint ([`quinn_proto::Endpoint`]), every connection (boxed, in
//! a table indexed by the endpoint's connection handle), one transmit buffer, one receive
//! buffer and the timers. There is no task, channel, `Notify` or driver per connection, as
//! quinn's async layer has (a tokio unbounded channel whose first 32-slot block is allocated
//! up front, a driver task, a transmit buffer per connection: ~9.7 KB per connection
//! measured, docs/PERFORMANCE.md "Endpoint loop"). What a connection's application does is an
//! [`App`]'s business, called from the loop: sans-IO, so it can be tested without a socket.
//!
//! What it is today: the loop, a timer heap, an echo application, and a server TLS session
//! that lets go of rustls once the handshake is done ([`lean`]), enough to hold idle
//! connections and to measure what each costs against quinn's async layer with the same
//! transport settings (`meshchat-edge-idle`, docs/PERFORMANCE.md "Endpoint loop"). The
//! session (authentication, push sequence, outbound queue, requests) is not on it yet.
//!
//! Known simplifications, each to be replaced as the node moves onto the loop: one datagram
//! per `recv_from` and per `send_to` (no GRO/GSO batching, no `quinn-udp`); a datagram the
//! socket cannot take at once is dropped and left to QUIC's loss recovery; timers in a binary
//! heap with lazy deletion (a wheel scales better past 100k connections with busy timers);
//! no ECN and no local-address tracking (fine on a socket bound to one address).

pub mod echo;
pub mod lean;
pub mod tls;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use quinn_proto::{
    ConnectionHandle, DatagramEvent, Dir, Endpoint, EndpointConfig, Event, ServerConfig,
    StreamEvent, StreamId, Transmit,
};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tracing::{debug, trace};

/// Largest UDP datagram read.
const RECV_BUFFER: usize = 64 * 1024;
/// Bytes an application's answers may wait for a connection's flow-control window; past it the
/// connection is closed (a client that sends without reading).
const MAX_PENDING_BYTES: usize = 256 * 1024;
/// Application error code of a connection closed for [`MAX_PENDING_BYTES`].
const CLOSE_PENDING_FULL: u32 = 1;

/// What runs a connection's application protocol, called from the loop.
pub trait App {
    /// Per-connection application state, made when a connection is accepted.
    type Conn;

    /// A new connection's state.
    fn accept(&mut self, remote: SocketAddr) -> Self::Conn;

    /// `data` arrived on stream `stream` (`fin`: the peer finished it). Whatever is pushed
    /// onto `out` is written to the same stream, in order, as the peer's flow control allows
    /// (and the stream finished after it when `fin`); past `MAX_PENDING_BYTES` waiting, the
    /// connection is closed.
    fn on_stream(
        &mut self,
        conn: &mut Self::Conn,
        stream: StreamId,
        data: &[u8],
        fin: bool,
        out: &mut Vec<u8>,
    );

    /// The connection ended (closed by either side, or timed out) and its state goes.
    fn on_closed(&mut self, conn: Self::Conn);
}

/// Why the loop could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// The UDP socket failed.
    #[error("udp socket: {0}")]
    Socket(#[from] std::io::Error),
}

/// One connection as the loop keeps it.
struct Entry<C> {
    conn: quinn_proto::Connection,
    app: C,
    /// The deadline the connection asks for now.
    deadline: Option<Instant>,
    /// When its live heap entry fires (at or before `deadline`: a deadline that moves later
    /// is not pushed again, the entry re-arms when it fires), and the number that marks that
    /// entry (older heap entries of the connection are stale).
    queued: Option<Instant>,
    timer: u64,
    /// Answers waiting for the peer's flow-control window: stream, bytes, finish after them.
    pending: Vec<(StreamId, Vec<u8>, bool)>,
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
}

/// The endpoint loop: see the module docs.
pub struct Edge<A: App> {
    endpoint: Endpoint,
    server: Arc<ServerConfig>,
    conns: Vec<Option<Box<Entry<A::Conn>>>>,
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    next_timer: u64,
    app: A,
    /// The one transmit buffer: every datagram is built here and sent before the next.
    tx: Vec<u8>,
    /// Bytes an application wrote back, reused.
    out: Vec<u8>,
    stats: EdgeStats,
    stats_tx: watch::Sender<EdgeStats>,
}

impl<A: App> Edge<A> {
    /// A loop serving `server` and running `app` on each connection.
    pub fn new(server: Arc<ServerConfig>, app: A) -> Self {
        Self {
            endpoint: Endpoint::new(
                Arc::new(EndpointConfig::default()),
                Some(server.clone()),
                false,
                None,
            ),
            server,
            conns: Vec::new(),
            timers: BinaryHeap::new(),
            next_timer: 0,
            app,
            tx: Vec::new(),
            out: Vec::new(),
            stats: EdgeStats::default(),
            stats_tx: watch::channel(EdgeStats::default()).0,
        }
    }

    /// The loop's counters, updated as it runs.
    pub fn stats(&self) -> watch::Receiver<EdgeStats> {
        self.stats_tx.subscribe()
    }

    /// Serves `socket` until `stop` turns true.
    pub async fn run(
        mut self,
        socket: UdpSocket,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), EdgeError> {
        let mut rx = vec![0u8; RECV_BUFFER];
        loop {
            let deadline = self.next_deadline();
            let sleep = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                received = socket.recv_from(&mut rx) => match received {
                    Ok((n, from)) => {
                        let now = Instant::now();
                        self.datagram(&socket, now, from, &rx[..n]);
                    }
                    // An ICMP error reported on the socket, say: the loop goes on.
                    Err(e) => debug!(error = %e, "recv_from failed"),
                },
                () = sleep => self.expire(&socket, Instant::now()),
                _ = stop.changed() => break,
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

    /// The earliest live deadline, dropping stale heap entries on the way.
    fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(Reverse((at, handle, timer))) = self.timers.peek().copied() {
            match self.entry(handle) {
                Some(e) if e.timer == timer => return Some(at),
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

    /// Runs the timeouts due at `now`: the heap entries due now are taken first, so a
    /// connection that asks again for a deadline already past is served at the next turn of
    /// the loop, not in a spin here.
    fn expire(&mut self, socket: &UdpSocket, now: Instant) {
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
            if e.timer != timer {
                continue;
            }
            e.queued = None;
            match e.deadline {
                Some(d) if d <= now => {
                    e.conn.handle_timeout(now);
                    self.drive(socket, handle, now);
                }
                // The deadline moved later since this entry was queued: queue it again.
                Some(d) => {
                    self.next_timer += 1;
                    let id = self.next_timer;
                    if let Some(e) = self.entry(handle) {
                        e.timer = id;
                        e.queued = Some(d);
                    }
                    self.timers.push(Reverse((d, handle, id)));
                }
                None => {}
            }
        }
    }

    /// One datagram from `from`.
    fn datagram(&mut self, socket: &UdpSocket, now: Instant, from: SocketAddr, data: &[u8]) {
        // quinn-proto writes a response it makes itself from the start of an empty buffer.
        self.tx.clear();
        let event = self
            .endpoint
            .handle(now, from, None, None, BytesMut::from(data), &mut self.tx);
        match event {
            Some(DatagramEvent::ConnectionEvent(handle, event)) => {
                if let Some(e) = self.entry(handle.0) {
                    e.conn.handle_event(event);
                    self.drive(socket, handle.0, now);
                }
            }
            Some(DatagramEvent::NewConnection(incoming)) => {
                let remote = incoming.remote_address();
                self.tx.clear();
                match self
                    .endpoint
                    .accept(incoming, now, &mut self.tx, Some(self.server.clone()))
                {
                    Ok((handle, conn)) => {
                        let app = self.app.accept(remote);
                        let slot = handle.0;
                        if self.conns.len() <= slot {
                            self.conns.resize_with(slot + 1, || None);
                        }
                        self.conns[slot] = Some(Box::new(Entry {
                            conn,
                            app,
                            deadline: None,
                            queued: None,
                            timer: 0,
                            pending: Vec::new(),
                        }));
                        self.stats.connections += 1;
                        self.stats.accepted += 1;
                        trace!(%remote, handle = slot, "connection accepted");
                        self.drive(socket, slot, now);
                    }
                    Err(e) => {
                        debug!(%remote, error = %e.cause, "connection refused");
                        if let Some(t) = e.response {
                            self.send(socket, &t);
                        }
                    }
                }
            }
            Some(DatagramEvent::Response(t)) => self.send(socket, &t),
            None => {}
        }
    }

    /// Sends the datagram in the transmit buffer; one the socket cannot take now is dropped.
    fn send(&mut self, socket: &UdpSocket, t: &Transmit) {
        match socket.try_send_to(&self.tx[..t.size], t.destination) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => self.stats.send_dropped += 1,
            Err(e) => debug!(to = %t.destination, error = %e, "send failed"),
        }
    }

    /// Brings connection `handle` up to date after something happened to it: its events for
    /// the endpoint, its application events, its datagrams, its next deadline; and removes it
    /// once it is drained.
    fn drive(&mut self, socket: &UdpSocket, handle: usize, now: Instant) {
        let Some(mut entry) = self.conns.get_mut(handle).and_then(Option::take) else {
            return;
        };
        let e = &mut *entry;
        while let Some(event) = e.conn.poll_endpoint_events() {
            if let Some(back) = self.endpoint.handle_event(ConnectionHandle(handle), event) {
                e.conn.handle_event(back);
            }
        }
        while let Some(event) = e.conn.poll() {
            match event {
                Event::Stream(StreamEvent::Opened { dir: Dir::Bi }) => {
                    while let Some(id) = e.conn.streams().accept(Dir::Bi) {
                        self.read(e, id, now);
                    }
                }
                Event::Stream(StreamEvent::Readable { id }) => self.read(e, id, now),
                Event::Stream(StreamEvent::Writable { id }) => flush(e, id),
                // The peer will read no more of it: what waits for it goes.
                Event::Stream(StreamEvent::Stopped { id, .. }) => {
                    e.pending.retain(|p| p.0 != id);
                }
                _ => {}
            }
        }
        loop {
            self.tx.clear();
            let Some(t) = e.conn.poll_transmit(now, 1, &mut self.tx) else {
                break;
            };
            self.send(socket, &t);
        }
        // As quinn's driver, events queued since the first pass go to the endpoint before the
        // connection can be dropped (its `Drained` must reach the endpoint, or the endpoint
        // keeps the handle).
        while let Some(event) = e.conn.poll_endpoint_events() {
            if let Some(back) = self.endpoint.handle_event(ConnectionHandle(handle), event) {
                e.conn.handle_event(back);
            }
        }
        if e.conn.is_drained() {
            self.stats.connections -= 1;
            self.app.on_closed(entry.app);
            trace!(handle, "connection drained");
            return;
        }
        // A deadline earlier than the queued entry gets a new entry; a later one waits for the
        // queued entry to fire and re-arm (`expire`): a busy connection's idle deadline, which
        // moves with every packet, does not fill the heap.
        e.deadline = e.conn.poll_timeout();
        if let Some(at) = e.deadline
            && e.queued.is_none_or(|q| at < q)
        {
            self.next_timer += 1;
            e.timer = self.next_timer;
            e.queued = Some(at);
            self.timers.push(Reverse((at, handle, e.timer)));
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
                    .is_some_and(|e| e.timer == *id)
            });
        }
    }

    /// Reads what stream `id` has and hands it to the application; writes back its answer.
    fn read(&mut self, e: &mut Entry<A::Conn>, id: StreamId, now: Instant) {
        let mut recv = e.conn.recv_stream(id);
        let Ok(mut chunks) = recv.read(true) else {
            return;
        };
        let mut data = Vec::new();
        let mut fin = false;
        loop {
            match chunks.next(usize::MAX) {
                Ok(Some(chunk)) => data.extend_from_slice(&chunk.bytes),
                Ok(None) => {
                    fin = true;
                    break;
                }
                Err(_) => break,
            }
        }
        let _ = chunks.finalize();
        if data.is_empty() && !fin {
            return;
        }
        self.out.clear();
        self.app
            .on_stream(&mut e.app, id, &data, fin, &mut self.out);
        if self.out.is_empty() && !fin {
            return;
        }
        match e.pending.iter_mut().find(|p| p.0 == id) {
            // Behind what already waits: in order.
            Some(p) => {
                p.1.extend_from_slice(&self.out);
                p.2 |= fin;
            }
            None => e.pending.push((id, self.out.clone(), fin)),
        }
        flush(e, id);
        let waiting: usize = e.pending.iter().map(|p| p.1.len()).sum();
        if waiting > MAX_PENDING_BYTES {
            debug!(waiting, "answers not read by the peer: connection closed");
            e.conn.close(
                now,
                CLOSE_PENDING_FULL.into(),
                bytes::Bytes::from_static(b"answers not read"),
            );
        }
    }
}

/// Writes what waits for stream `id` as far as flow control allows; finishes the stream once
/// all of it is written if asked.
fn flush<C>(e: &mut Entry<C>, id: StreamId) {
    let Some(at) = e.pending.iter().position(|p| p.0 == id) else {
        return;
    };
    let (_, data, fin) = &mut e.pending[at];
    // Until all is written or a write says `Blocked`: quinn-proto raises `Writable` later only
    // for a stream whose write was refused whole (one cut short by the connection's window
    // would never hear of more room).
    let mut written = 0;
    while written < data.len() {
        match e.conn.send_stream(id).write(&data[written..]) {
            Ok(0) | Err(quinn_proto::WriteError::Blocked) => break,
            Ok(n) => written += n,
            // Stopped or reset by the peer, or closed: nothing more goes out on it.
            Err(_) => {
                e.pending.swap_remove(at);
                return;
            }
        }
    }
    data.drain(..written);
    if data.is_empty() {
        let fin = *fin;
        e.pending.swap_remove(at);
        if fin {
            let _ = e.conn.send_stream(id).finish();
        }
    }
}
