//! The high-level client: connect (following redirects), authenticate, send with retry,
//! queries, and reconnect that fills gaps from history.
//!
//! Events arrive on [`Events`], which drops messages already seen (by message id) and keeps,
//! per chat, the newest message id received: the cursor that [`Client::reconnect`] fills gaps
//! from.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use meshchat_idgen::{ChannelId, ChatId, NodeId, UserId};
use meshchat_proto::client::{self as pb, ErrorCode, client_frame, server_frame};
use meshchat_proto::ids::{chat_from_wire, chat_to_wire};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tracing::debug;

use crate::conn::{Conn, ConnectOptions, Event, client_endpoint};
use crate::error::ClientError;

/// How many message ids [`Events`] remembers for dedup.
const DEDUP_WINDOW: usize = 16_384;
/// Redirect hops followed before giving up.
const MAX_REDIRECTS: usize = 3;
/// How far before the newest id seen a gap fill starts, in milliseconds of Snowflake time.
const GAP_FILL_OVERLAP_MS: u64 = 10_000;
/// How far before the newest id seen a fill after `Event::Resync` reads ([`Client::resync`]).
/// Covers a node cut off for about a minute (its lease ends within seconds; what it acked
/// before that reaches its recipients' nodes when the cut heals). Not a bound on every
/// partition: the resync should say from where (open work, docs/RELIABILITY.md).
const RESYNC_OVERLAP_MS: u64 = 120_000;
/// Attempts at one gap-fill page on a busy node before the fill stops.
const GAP_FILL_ATTEMPTS: u32 = 8;
/// Chats a gap fill reads at once.
const GAP_FILL_CONCURRENCY: usize = 8;
/// How long an acked send is kept for a re-push after a failover: longer than the liveness
/// timeout plus the ring's `member_ttl`, so anything the dead node acked but may not have
/// pushed yet is covered.
const RECENT_SENDS_FOR: Duration = Duration::from_secs(15);
/// Bound on the bodies of the sends kept for a re-push.
const RECENT_SENDS_BYTES: usize = 256 * 1024;
/// Bound on the number of sends kept for a re-push (below the node's send burst, so the
/// re-push itself is not rate limited).
const RECENT_SENDS_MAX: usize = 64;
/// Send attempts before giving up on a retryable error.
const SEND_ATTEMPTS: u32 = 6;
/// How long a node that failed to answer is passed over by a failover (and a redirect to it
/// is not followed): about two membership TTLs, by which time the ring has dropped a dead
/// node and redirects point at its successor.
const SUSPECT_FOR: Duration = Duration::from_secs(10);
/// How long an authentication waits on one node whose ring still names a suspect node as the
/// user's home (below the node's 10 s authentication timeout).
const SUSPECT_WAIT: Duration = Duration::from_secs(8);
/// How long one failover keeps trying before it reports the last error.
const FAILOVER_FOR: Duration = Duration::from_secs(60);
/// Tries to follow one redirect ([`Client::follow_redirect`]), with waits of 125-250 ms,
/// doubling to 2-4 s, between them (4-8 s of waiting), each try bounded by the connect
/// timeout and the authentication.
const REDIRECT_ATTEMPTS: u32 = 6;
/// How long a failover retries at short intervals (at most 500 ms apart) before it backs
/// off to [`FAILOVER_SLOW_CAP`]: the membership TTL and then some.
const FAILOVER_FAST_FOR: Duration = Duration::from_secs(6);
/// Longest wait between failover rounds once the fast phase is over.
const FAILOVER_SLOW_CAP: Duration = Duration::from_secs(4);

/// Who this client is logged in as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// User id.
    pub user: UserId,
    /// User name.
    pub name: String,
    /// Token for re-authentication.
    pub token: String,
    /// Token expiry, Unix ms.
    pub expires_unix_ms: u64,
}

#[derive(Debug, Default)]
struct Seen {
    ids: HashSet<u64>,
    order: VecDeque<u64>,
    cursors: HashMap<ChatId, u64>,
}

impl Seen {
    /// Records a message; false if it was seen before.
    fn record(&mut self, chat: Option<ChatId>, id: u64) -> bool {
        if !self.ids.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > DEDUP_WINDOW
            && let Some(old) = self.order.pop_front()
        {
            self.ids.remove(&old);
        }
        if let Some(chat) = chat {
            let c = self.cursors.entry(chat).or_insert(0);
            *c = (*c).max(id);
        }
        true
    }
}

/// The stream of events for the application. Messages are deduplicated by id.
#[derive(Debug)]
pub struct Events {
    rx: mpsc::Receiver<Event>,
    seen: Arc<Mutex<Seen>>,
}

impl Events {
    /// The next event; `None` once the client is dropped.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            let ev = self.rx.recv().await?;
            if let Event::Message(m) = &ev {
                let chat = chat_from_wire(m.chat.as_ref()).ok();
                if !self.seen.lock().record(chat, m.message_id) {
                    continue;
                }
            }
            return Some(ev);
        }
    }

    /// The next event within `timeout`.
    pub async fn next_within(&mut self, timeout: Duration) -> Option<Event> {
        tokio::time::timeout(timeout, self.next())
            .await
            .ok()
            .flatten()
    }
}

/// A meshchat client.
#[derive(Debug)]
pub struct Client {
    endpoint: quinn::Endpoint,
    opts: ConnectOptions,
    server: Mutex<String>,
    conn: Mutex<Option<Arc<Conn>>>,
    events: mpsc::Sender<Event>,
    seen: Arc<Mutex<Seen>>,
    session: Mutex<Option<Session>>,
    hello: Mutex<Option<pb::HelloOk>>,
    /// Whether this client's connections hide the user's presence (sent in each hello).
    hidden: std::sync::atomic::AtomicBool,
    /// Nodes to fail over to: the seeds, then the cluster's members once learned.
    known: Mutex<Vec<String>>,
    /// Whether the cluster's members were learned (at login, and again after a failover).
    learned: std::sync::atomic::AtomicBool,
    /// The ring's members as last learned (ids, addresses, weights), to predict a new home.
    members: Mutex<Vec<pb::ClusterMember>>,
    /// Nodes that failed to answer, and since when.
    suspects: Mutex<HashMap<String, std::time::Instant>>,
    /// One failover at a time (the supervisor and a send may both notice a dead node).
    failing_over: tokio::sync::Mutex<()>,
    /// Set by [`Client::close`]: the supervisor stops.
    closing: std::sync::atomic::AtomicBool,
    /// Gap fills that ran to the end ([`Client::gap_fills`]).
    gap_fills: Arc<std::sync::atomic::AtomicU64>,
    /// Sessions granted ([`Client::authentications`]).
    authentications: std::sync::atomic::AtomicU64,
    /// Early re-home attempts started ([`Client::early_rehome_attempts`]).
    early_attempts: std::sync::atomic::AtomicU64,
    /// The depth (ms before the newest id seen) owed by a fill that did not finish (its
    /// connection closed under it: a failover, a redirect followed): the next fill reads at
    /// least this far back.
    owed_depth: Arc<std::sync::atomic::AtomicU64>,
    /// Sends acked lately, for a re-push after a failover ([`RecentSends`]).
    recent: Mutex<RecentSends>,
}

/// A candidate connection, closed when dropped unless taken out first (an attempt that
/// failed or was called off, even half-way, leaves no connection behind).
struct CloseUnlessKept(Option<Arc<Conn>>);

impl Drop for CloseUnlessKept {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            c.close();
        }
    }
}

/// Sends acked within [`RECENT_SENDS_FOR`], at most [`RECENT_SENDS_MAX`] and
/// [`RECENT_SENDS_BYTES`] of bodies (the newest kept). A
/// node that acked a send (the message is durable) and died before its pushes left it took
/// them along, and no one else knows they are missing: after a failover the client sends
/// these again with the same client message id, and the new home, finding them stored,
/// pushes the stored messages again (docs/PROTOCOL.md, "Delivery semantics").
#[derive(Debug, Default)]
struct RecentSends {
    sends: VecDeque<(std::time::Instant, pb::SendMessage)>,
    bytes: usize,
}

impl RecentSends {
    fn record(&mut self, at: std::time::Instant, send: pb::SendMessage) {
        let now = std::time::Instant::now();
        self.bytes += send.body.len();
        self.sends.push_back((at, send));
        while self.bytes > RECENT_SENDS_BYTES
            || self.sends.len() > RECENT_SENDS_MAX
            || self
                .sends
                .front()
                .is_some_and(|(at, _)| now.duration_since(*at) > RECENT_SENDS_FOR)
        {
            match self.sends.pop_front() {
                Some((_, old)) => self.bytes -= old.body.len(),
                None => break,
            }
        }
    }

    fn take(&mut self) -> Vec<(std::time::Instant, pb::SendMessage)> {
        let now = std::time::Instant::now();
        self.bytes = 0;
        std::mem::take(&mut self.sends)
            .into_iter()
            .filter(|(at, _)| now.duration_since(*at) <= RECENT_SENDS_FOR)
            .collect()
    }
}

/// A new client message id: 32 hex digits, the Unix time in milliseconds (12 digits, 48 bits)
/// then 80 random bits, so ids sort by the time they were made (as UUIDv7 does). Unique
/// without coordination; the time first lets a store append each new id at the end of its
/// idempotency index instead of on a page of its own (docs/STORAGE.md).
fn new_client_msg_id() -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    client_msg_id_at(millis, rand::random())
}

/// [`new_client_msg_id`] at `millis` with `random`'s low 80 bits.
fn client_msg_id_at(millis: u64, random: u128) -> String {
    let random = random & ((1 << 80) - 1);
    format!("{:012x}{random:020x}", millis & ((1 << 48) - 1))
}

fn hello_body(hide_presence: bool) -> client_frame::Body {
    client_frame::Body::Hello(pb::Hello {
        protocol_version: meshchat_proto::PROTOCOL_VERSION,
        client_name: concat!("meshchat-client/", env!("CARGO_PKG_VERSION")).into(),
        hide_presence,
    })
}

fn unexpected(b: &server_frame::Body) -> ClientError {
    ClientError::Protocol(format!("unexpected reply: {b:?}"))
}

/// The pause before gap-fill attempt `attempt` (1-based) on a busy node: 200 ms, doubling,
/// at most 3.2 s.
fn gap_fill_backoff(attempt: u32) -> Duration {
    Duration::from_millis(100) * 2u32.pow(attempt.min(5))
}

/// How one chat's gap fill ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FillEnd {
    /// Read up to its head, or a chat this user may no longer read.
    Done,
    /// A busy node never answered: the chat may still have a gap.
    Incomplete,
    /// The connection died or the application dropped its events: the fill is over.
    Stopped,
}

/// The chat list on `conn`.
async fn chat_list_on(conn: &Conn) -> Result<Vec<pb::ChatSummary>, ClientError> {
    match conn
        .request(client_frame::Body::ChatList(pb::ChatListQuery {}))
        .await?
    {
        server_frame::Body::ChatList(l) => Ok(l.chats),
        other => Err(unexpected(&other)),
    }
}

/// The chat list on `conn`, for a gap fill: a busy node (right after a failover, say) is
/// retried as history pages are, since without the list there is no fill at all.
async fn chat_list_retried(conn: &Conn) -> Result<Vec<pb::ChatSummary>, ClientError> {
    let mut attempt = 0u32;
    loop {
        match chat_list_on(conn).await {
            Ok(chats) => return Ok(chats),
            Err(e) if e.is_retryable() && conn.is_open() && attempt < GAP_FILL_ATTEMPTS => {
                attempt += 1;
                debug!(error = %e, attempt, "gap fill: chat list retried");
                tokio::time::sleep(gap_fill_backoff(attempt)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Reads `chat` forward from `cursor` to its head on `conn` and feeds the messages to
/// `events`.
async fn fill_chat(
    conn: &Conn,
    events: &mpsc::Sender<Event>,
    chat: ChatId,
    mut cursor: u64,
) -> FillEnd {
    let mut attempt = 0u32;
    loop {
        let page = match conn
            .request(client_frame::Body::History(pb::HistoryQuery {
                chat: Some(chat_to_wire(chat)),
                cursor,
                direction: pb::Direction::Forward as i32,
                limit: 0,
            }))
            .await
        {
            Ok(server_frame::Body::HistoryPage(p)) => p,
            // A busy node (timeout, overload, rate limit) on a live connection: the same
            // page again, with backoff. Giving up here would lose the gap for good (found by
            // the load test under overload).
            Err(e) if e.is_retryable() && conn.is_open() && attempt < GAP_FILL_ATTEMPTS => {
                attempt += 1;
                debug!(error = %e, attempt, %chat, "gap fill page retried");
                tokio::time::sleep(gap_fill_backoff(attempt)).await;
                continue;
            }
            Ok(other) => {
                debug!(reply = ?other, "gap fill: unexpected reply");
                return FillEnd::Done;
            }
            // This chat only (say, a channel left on another device): go on with the others.
            // A chat I may no longer read has nothing to fill; a busy node that never
            // answered leaves it incomplete.
            Err(e @ ClientError::Server { .. }) => {
                debug!(error = %e, %chat, "gap fill skips a chat");
                return if e.is_retryable() {
                    FillEnd::Incomplete
                } else {
                    FillEnd::Done
                };
            }
            // Out of attempts on a live connection: this chat only.
            Err(e) if e.is_retryable() && conn.is_open() => {
                debug!(error = %e, %chat, "gap fill gives up on a chat for now");
                return FillEnd::Incomplete;
            }
            // A dead connection ends the fill.
            Err(e) => {
                debug!(error = %e, "gap fill stopped");
                return FillEnd::Stopped;
            }
        };
        attempt = 0;
        for m in page.messages {
            if events.send(Event::Message(m)).await.is_err() {
                return FillEnd::Stopped;
            }
        }
        if page.next_cursor == 0 {
            return FillEnd::Done;
        }
        cursor = page.next_cursor;
    }
}

impl Client {
    /// Connects to `server` (`host:port`) and says hello. Does not authenticate.
    pub async fn connect(
        server: &str,
        opts: ConnectOptions,
    ) -> Result<(Self, Events), ClientError> {
        let bind: SocketAddr = if crate::conn::resolve(server)?.0.is_ipv6() {
            "[::]:0"
                .parse()
                .map_err(|_| ClientError::Setup("bind".into()))?
        } else {
            "0.0.0.0:0"
                .parse()
                .map_err(|_| ClientError::Setup("bind".into()))?
        };
        let endpoint = client_endpoint(&opts, bind)?;
        Self::connect_with(endpoint, server, opts).await
    }

    /// Like [`Client::connect`] over an existing endpoint (many clients can share one).
    pub async fn connect_with(
        endpoint: quinn::Endpoint,
        server: &str,
        opts: ConnectOptions,
    ) -> Result<(Self, Events), ClientError> {
        let (client, events) = Self::unconnected(endpoint, server, opts);
        client.open().await?;
        Ok((client, events))
    }

    /// Connects over `endpoint` and authenticates with a session `token`, the hello and the
    /// authentication sent together. A returning client resumes this way: when `endpoint`
    /// holds a session ticket from that node (tickets are single use and good only at the
    /// node that issued them), both go in 0-RTT data and the session is back one round trip
    /// after the first packet (docs/PROTOCOL.md, "0-RTT resumption"); otherwise it costs a
    /// full handshake. Follows a redirect to the user's home node.
    pub async fn connect_authenticated(
        endpoint: quinn::Endpoint,
        server: &str,
        opts: ConnectOptions,
        token: &str,
    ) -> Result<(Self, Events, Session), ClientError> {
        let (client, events) = Self::unconnected(endpoint, server, opts);
        let session = client.open_authenticated(token).await?;
        Ok((client, events, session))
    }

    /// A client of `server` with no connection yet.
    fn unconnected(
        endpoint: quinn::Endpoint,
        server: &str,
        opts: ConnectOptions,
    ) -> (Self, Events) {
        let (tx, rx) = mpsc::channel(opts.event_buffer.max(1));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let hide_presence = opts.hide_presence;
        let mut known = vec![server.to_owned()];
        known.extend(opts.seeds.iter().cloned());
        known.dedup();
        let client = Self {
            endpoint,
            opts,
            server: Mutex::new(server.to_owned()),
            conn: Mutex::new(None),
            events: tx,
            seen: seen.clone(),
            session: Mutex::new(None),
            hello: Mutex::new(None),
            hidden: std::sync::atomic::AtomicBool::new(hide_presence),
            known: Mutex::new(known),
            learned: std::sync::atomic::AtomicBool::new(false),
            members: Mutex::new(Vec::new()),
            suspects: Mutex::new(HashMap::new()),
            failing_over: tokio::sync::Mutex::new(()),
            closing: std::sync::atomic::AtomicBool::new(false),
            gap_fills: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            authentications: std::sync::atomic::AtomicU64::new(0),
            early_attempts: std::sync::atomic::AtomicU64::new(0),
            owed_depth: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            recent: Mutex::new(RecentSends::default()),
        };
        (client, Events { rx, seen })
    }

    async fn open(&self) -> Result<Arc<Conn>, ClientError> {
        let conn = self.dial().await?;
        let hello = conn.request(self.hello_body()).await;
        self.adopt(conn, hello)
    }

    /// Opens a connection to the current server (QUIC handshake and stream), nothing more.
    async fn dial(&self) -> Result<Arc<Conn>, ClientError> {
        let server = self.server.lock().clone();
        Conn::open(&self.endpoint, &server, &self.opts, self.events.clone()).await
    }

    /// Makes `conn` this client's connection once the node answered its hello. On any other
    /// answer the connection is closed: it must not linger (and, with an authentication sent
    /// along, keep receiving this user's pushes).
    fn adopt(
        &self,
        conn: Arc<Conn>,
        hello: Result<server_frame::Body, ClientError>,
    ) -> Result<Arc<Conn>, ClientError> {
        match hello {
            Ok(server_frame::Body::HelloOk(h)) => *self.hello.lock() = Some(h),
            Ok(other) => {
                conn.close();
                return Err(unexpected(&other));
            }
            Err(e) => {
                conn.close();
                return Err(e);
            }
        }
        *self.conn.lock() = Some(conn.clone());
        Ok(conn)
    }

    /// Opens a connection and authenticates with `token`, the hello and the authentication
    /// sent together (the node reads them in order): one round trip fewer than
    /// [`Client::open`] then [`Client::authenticate`], which counts when a dead node's
    /// clients all fail over to busy survivors.
    async fn open_authenticated(&self, token: &str) -> Result<Session, ClientError> {
        let conn = self.dial().await?;
        let body = client_frame::Body::Authenticate(pb::Authenticate {
            token: token.into(),
        });
        // `biased`: the hello is polled first, so it takes the stream's write lock first (a
        // node also takes an authentication without a hello before it).
        let (hello, first) = tokio::join!(
            biased;
            conn.request(self.hello_body()),
            conn.request(body.clone())
        );
        self.adopt(conn, hello)?;
        self.auth_from(body, Some(first)).await
    }

    /// The live connection.
    pub fn conn(&self) -> Result<Arc<Conn>, ClientError> {
        self.conn
            .lock()
            .clone()
            .ok_or_else(|| ClientError::Disconnected("not connected".into()))
    }

    /// What the node said in its hello.
    pub fn hello(&self) -> Option<pb::HelloOk> {
        *self.hello.lock()
    }

    /// The logged-in session.
    pub fn session(&self) -> Option<Session> {
        self.session.lock().clone()
    }

    /// My user id.
    pub fn me(&self) -> Result<UserId, ClientError> {
        self.session
            .lock()
            .as_ref()
            .map(|s| s.user)
            .ok_or(ClientError::NotLoggedIn)
    }

    /// The node currently connected to.
    pub fn server(&self) -> String {
        self.server.lock().clone()
    }

    /// Sends a request on the current connection.
    pub async fn request(
        &self,
        body: client_frame::Body,
    ) -> Result<server_frame::Body, ClientError> {
        self.conn()?.request(body).await
    }

    async fn auth(&self, body: client_frame::Body) -> Result<Session, ClientError> {
        self.auth_from(body, None).await
    }

    /// [`Client::auth`], with the reply to `body`'s first sending already in hand if `first`.
    async fn auth_from(
        &self,
        body: client_frame::Body,
        mut first: Option<Result<server_frame::Body, ClientError>>,
    ) -> Result<Session, ClientError> {
        let mut body = body;
        let mut redirects = 0;
        let mut waited = Duration::ZERO;
        loop {
            let reply = match first.take() {
                Some(r) => r?,
                None => self.request(body.clone()).await?,
            };
            match reply {
                server_frame::Body::AuthOk(ok) => {
                    let s = self.accept_session(ok);
                    self.learn_members().await;
                    return Ok(s);
                }
                server_frame::Body::Redirect(r) => {
                    debug!(to = %r.address, epoch = r.ring_epoch, "redirected");
                    // The redirect carries a token: authenticate with it from now on (a
                    // registration must not be repeated).
                    if !r.token.is_empty() {
                        body =
                            client_frame::Body::Authenticate(pb::Authenticate { token: r.token });
                    }
                    if self.is_suspect(&r.address) {
                        // The ring still names a node that just failed to answer: its
                        // registration has not expired yet. Ask this node again, on this
                        // connection, until its ring has moved on (no new handshake per try:
                        // thousands of clients failing over at once must not become a
                        // handshake storm), within the node's authentication timeout.
                        if waited >= SUSPECT_WAIT {
                            return Err(ClientError::Connect(format!(
                                "redirected to {}, which did not answer recently",
                                r.address
                            )));
                        }
                        let pause = Duration::from_millis(250 + rand::random::<u64>() % 250);
                        tokio::time::sleep(pause).await;
                        waited += pause;
                        continue;
                    }
                    redirects += 1;
                    if redirects > MAX_REDIRECTS {
                        return Err(ClientError::Protocol("too many redirects".into()));
                    }
                    if let Ok(c) = self.conn() {
                        c.retire();
                    }
                    *self.server.lock() = r.address;
                    self.open().await?;
                }
                other => return Err(unexpected(&other)),
            }
        }
    }

    /// Makes the session an `AuthOk` grants this client's.
    fn accept_session(&self, ok: pb::AuthOk) -> Session {
        let s = self.store_session(ok);
        self.authentications
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        s
    }

    /// Keeps the session an `AuthOk` carries (a new token for this connection's user).
    fn store_session(&self, ok: pb::AuthOk) -> Session {
        let s = Session {
            user: UserId(ok.user_id),
            name: ok.user_name,
            token: ok.token,
            expires_unix_ms: ok.expires_unix_ms,
        };
        *self.session.lock() = Some(s.clone());
        s
    }

    /// Refreshes the session's token on the current connection: the node answers a fresh
    /// token (never valid past the login's hard end, `auth.max_login_lifetime`) and keeps the
    /// connection open until that one expires. Call it before `expires_unix_ms`; once the
    /// login's hard end has passed it fails with `TOKEN_EXPIRED` and the user must log in.
    pub async fn refresh_token(&self) -> Result<Session, ClientError> {
        let token = self.session_token()?;
        match self
            .request(client_frame::Body::Authenticate(pb::Authenticate { token }))
            .await?
        {
            server_frame::Body::AuthOk(ok) => Ok(self.store_session(ok)),
            other => Err(ClientError::Protocol(format!(
                "unexpected answer to a token refresh: {other:?}"
            ))),
        }
    }

    /// Changes my password; every other login of mine is signed out (their tokens refused,
    /// my other connections closed). The session gets a fresh token.
    pub async fn change_password(&self, old: &str, new: &str) -> Result<Session, ClientError> {
        match self
            .request(client_frame::Body::ChangePassword(pb::ChangePassword {
                old_password: old.into(),
                new_password: new.into(),
            }))
            .await?
        {
            server_frame::Body::AuthOk(ok) => Ok(self.store_session(ok)),
            other => Err(unexpected(&other)),
        }
    }

    /// Signs out: the node closes this connection after answering. With `everywhere`, every
    /// login of mine made up to now is signed out too (tokens refused, other connections
    /// closed). The session is forgotten either way.
    pub async fn logout(&self, everywhere: bool) -> Result<(), ClientError> {
        // Forgotten first: a connection lost meanwhile must not be re-authenticated with it.
        *self.session.lock() = None;
        let reply = self
            .request(client_frame::Body::Logout(pb::Logout { everywhere }))
            .await?;
        match reply {
            server_frame::Body::Done(_) => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Registers a new user and logs this connection in.
    pub async fn register(&self, name: &str, password: &str) -> Result<Session, ClientError> {
        self.auth(client_frame::Body::Register(pb::Register {
            user_name: name.into(),
            password: password.into(),
        }))
        .await
    }

    /// Logs in with a password.
    pub async fn login(&self, name: &str, password: &str) -> Result<Session, ClientError> {
        self.auth(client_frame::Body::Login(pb::Login {
            user_name: name.into(),
            password: password.into(),
        }))
        .await
    }

    /// Authenticates with a token from an earlier register/login.
    pub async fn authenticate(&self, token: &str) -> Result<Session, ClientError> {
        self.auth(client_frame::Body::Authenticate(pb::Authenticate {
            token: token.into(),
        }))
        .await
    }

    /// Opens a new connection, re-authenticates with the session token, and fills gaps:
    /// every chat with a known cursor is read forward from it, and chats new to this client
    /// from my delivered mark. Filled messages arrive on [`Events`] (deduplicated), from a
    /// background task.
    pub async fn reconnect(&self) -> Result<(), ClientError> {
        self.reconnect_at(None).await
    }

    /// [`Client::reconnect`], to `server` if given.
    async fn reconnect_at(&self, server: Option<&str>) -> Result<(), ClientError> {
        let token = self.session_token()?;
        // Not beside a failover: each would close the other's new connection.
        let _one = self.failing_over.lock().await;
        if let Some(server) = server {
            *self.server.lock() = server.to_owned();
        }
        let retired = self.conn().ok();
        // Whether the application still thinks it is connected (a closed connection already
        // sent its Disconnected).
        let was_open = retired.as_ref().is_some_and(|c| c.is_open());
        if let Some(c) = &retired {
            c.retire();
        }
        // The hello and the authentication in one flight (in 0-RTT data, with a ticket).
        if let Err(e) = self.open_authenticated(&token).await {
            // A new connection adopted before its authentication failed goes quietly too:
            // one event says the client is not connected.
            if let Ok(now) = self.conn()
                && !retired.as_ref().is_some_and(|r| Arc::ptr_eq(r, &now))
            {
                now.retire();
            }
            if was_open {
                // Not awaited: the caller may be the one draining the events.
                let _ = self.events.try_send(Event::Disconnected {
                    code: 0,
                    reason: format!("reconnect failed: {e}"),
                });
            }
            return Err(e);
        }
        self.fill_gaps().await.map(drop)
    }

    /// Reconnects through another node (say, when the current one died): that node redirects
    /// the client to its home if needed; then the gap is filled from history.
    pub async fn reconnect_via(&self, server: &str) -> Result<(), ClientError> {
        self.reconnect_at(Some(server)).await
    }

    /// Follows a redirect push (the ring moved this user's home): connects to the new home,
    /// re-authenticates with the session token and fills the gap from history. Make before
    /// break: the current connection stays this client's until the new one is authenticated
    /// (then it is closed); a new home that does not answer (one that just came back takes
    /// many moved users at once) is tried again with backoff ([`REDIRECT_ATTEMPTS`]). A
    /// user left on a node that is not its home misses pushes from other nodes (they go to
    /// the home), so the last resort is a failover, which lands on the home through any node.
    /// The fill afterwards reads as far back as a resync's.
    pub async fn follow_redirect(&self, r: &pb::Redirect) -> Result<(), ClientError> {
        if r.address.is_empty() {
            return Err(ClientError::Protocol("redirect without an address".into()));
        }
        let mut backoff = Duration::from_millis(250);
        let mut last = ClientError::Timeout;
        for attempt in 0..REDIRECT_ATTEMPTS {
            if attempt > 0 {
                let half = backoff.as_millis() as u64 / 2;
                tokio::time::sleep(Duration::from_millis(
                    half + rand::random::<u64>() % (half + 1),
                ))
                .await;
                backoff = (backoff * 2).min(Duration::from_secs(4));
            }
            if self.is_closing() {
                return Err(ClientError::Disconnected("client closed".into()));
            }
            match self.switch_to(&r.address).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_retryable() => {
                    debug!(address = %r.address, attempt, error = %e, "redirect not followed yet");
                    last = e;
                }
                // No session to move (logged out, token expired): nothing to fail over.
                Err(e @ ClientError::NotLoggedIn) => return Err(e),
                Err(e) => {
                    last = e;
                    break;
                }
            }
        }
        debug!(address = %r.address, error = %last, "redirect not followed: failing over");
        self.failover().await
    }

    /// One make-before-break move to `server`: a new authenticated connection there
    /// replaces the current one, which is closed only then; on failure the current one (if
    /// still open) stays this client's connection.
    async fn switch_to(&self, server: &str) -> Result<(), ClientError> {
        let token = self.session_token()?;
        {
            // Not beside a failover: each would close the other's new connection.
            let _one = self.failing_over.lock().await;
            let old = self.conn().ok();
            let old_server = self.server();
            *self.server.lock() = server.to_owned();
            match self.open_authenticated(&token).await {
                Ok(_) => {
                    if let Some(old) = old
                        && self.conn().is_ok_and(|now| !Arc::ptr_eq(&now, &old))
                    {
                        old.retire();
                    }
                }
                Err(e) => {
                    if let Ok(now) = self.conn()
                        && !old.as_ref().is_some_and(|o| Arc::ptr_eq(o, &now))
                    {
                        now.close();
                    }
                    *self.server.lock() = old_server;
                    // Even closed: the supervisor then sees it closed and fails over (with
                    // no connection at all it would take a failover to be running).
                    *self.conn.lock() = old;
                    return Err(e);
                }
            }
        }
        // Until the redirect came (paced: seconds after the ring changed), pushes from other
        // nodes went to the new home, where this user was not yet: read as far back as for
        // a resync, not 10 s (the newest id seen kept moving with this node's own pushes).
        self.fill_gaps_back(RESYNC_OVERLAP_MS).await.map(drop)
    }

    /// The session's token, for re-authentication.
    fn session_token(&self) -> Result<String, ClientError> {
        self.session
            .lock()
            .as_ref()
            .map(|s| s.token.clone())
            .ok_or(ClientError::NotLoggedIn)
    }

    fn is_closing(&self) -> bool {
        self.closing.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Learns the cluster's members (client addresses, ids, weights), for failover (best
    /// effort): once at login, and again after each failover (the ring changed).
    async fn learn_members(&self) {
        use std::sync::atomic::Ordering;
        if self.learned.swap(true, Ordering::SeqCst) {
            return;
        }
        match self.cluster().await {
            Ok(info) => {
                let mut known = self.known.lock();
                for m in &info.members {
                    if !m.address.is_empty() && !known.contains(&m.address) {
                        known.push(m.address.clone());
                    }
                }
                *self.members.lock() = info.members;
            }
            Err(e) => {
                debug!(error = %e, "cluster members not learned");
                self.learned.store(false, Ordering::SeqCst);
            }
        }
    }

    fn suspect(&self, server: &str) {
        self.suspects
            .lock()
            .insert(server.to_owned(), std::time::Instant::now());
    }

    fn unsuspect(&self, server: &str) {
        self.suspects.lock().remove(server);
    }

    fn is_suspect(&self, server: &str) -> bool {
        let mut suspects = self.suspects.lock();
        suspects.retain(|_, since| since.elapsed() < SUSPECT_FOR);
        suspects.contains_key(server)
    }

    /// Nodes to try, in order: every known node not suspected (the predicted home first),
    /// or every known node if all are.
    fn candidates(&self) -> Vec<String> {
        let known = self.known.lock().clone();
        let mut fresh: Vec<String> = known
            .iter()
            .filter(|s| !self.is_suspect(s))
            .cloned()
            .collect();
        if let Some(home) = self.predicted_home()
            && let Some(at) = fresh.iter().position(|s| *s == home)
        {
            fresh[..=at].rotate_right(1);
        }
        if fresh.is_empty() { known } else { fresh }
    }

    /// Where the ring will put this user once the suspected nodes have left it: the ring is
    /// a pure function of the members' ids and weights (docs/PROTOCOL.md, "Liveness and
    /// failover"), so a failover can go straight to the new home (one handshake, no
    /// redirect). `None` before the members are known.
    fn predicted_home(&self) -> Option<String> {
        let me = self.me().ok()?;
        let members = self.members.lock().clone();
        let live: Vec<&pb::ClusterMember> = members
            .iter()
            .filter(|m| !self.is_suspect(&m.address))
            .collect();
        let weights: std::collections::BTreeMap<NodeId, u32> =
            live.iter().map(|m| (NodeId(m.node_id), m.weight)).collect();
        let owner = meshchat_backplane::ring::owner_among(&weights, me)?;
        live.iter()
            .find(|m| NodeId(m.node_id) == owner)
            .map(|m| m.address.clone())
    }

    /// Re-homes this session after its connection failed: passes over the node that failed,
    /// tries every other known node (seeds and the members learned at login) with jittered
    /// backoff until one authenticates the session (redirecting it to its home on the current
    /// ring, never back to a node that just failed to answer), then fills the gap from
    /// history. Gives up after a minute, or at once on an error no retry can fix (an expired
    /// token). Concurrent calls share one failover.
    pub async fn failover(&self) -> Result<(), ClientError> {
        let before = self.conn().ok();
        let _one = self.failing_over.lock().await;
        if let Ok(now) = self.conn()
            && now.is_open()
            && !before.as_ref().is_some_and(|b| Arc::ptr_eq(b, &now))
        {
            return Ok(()); // another caller already failed over
        }
        let token = self.session_token()?;
        if let Some(c) = before {
            c.close();
        }
        self.suspect(&self.server());
        // Every client of a dead node notices at about the same time: spread their first
        // attempts so the survivors see a ramp, not a wall of handshakes.
        let started = std::time::Instant::now();
        tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 500)).await;
        let deadline = std::time::Instant::now() + FAILOVER_FOR;
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut last = ClientError::Connect("no node to fail over to".into());
            for server in self.candidates() {
                if self.is_closing() {
                    return Err(ClientError::Disconnected("client closed".into()));
                }
                *self.server.lock() = server.clone();
                let tried = std::time::Instant::now();
                let attempt = self.open_authenticated(&token);
                match attempt.await {
                    Ok(_) if self.is_closing() => {
                        // Closed while this attempt ran: do not leave a session behind.
                        if let Ok(c) = self.conn() {
                            c.close();
                        }
                        return Err(ClientError::Disconnected("client closed".into()));
                    }
                    Ok(_) => {
                        debug!(
                            %server,
                            took_ms = started.elapsed().as_millis() as u64,
                            attempt_ms = tried.elapsed().as_millis() as u64,
                            early = false,
                            "failed over"
                        );
                        return self.after_rehome(GAP_FILL_OVERLAP_MS).await;
                    }
                    Err(e) if e.is_retryable() => {
                        debug!(%server, error = %e, "failover candidate failed");
                        if matches!(e, ClientError::Connect(_) | ClientError::Timeout)
                            || e.code() == Some(ErrorCode::Unavailable)
                        {
                            // Only this node, not the one it redirected to.
                            if !self.is_suspect(&self.server()) || self.server() == server {
                                self.suspect(&self.server());
                            }
                        }
                        if let Ok(c) = self.conn() {
                            c.close();
                        }
                        last = e;
                    }
                    Err(e) => return Err(e),
                }
            }
            if std::time::Instant::now() >= deadline {
                return Err(last);
            }
            // Short cap at first: while the ring still names the dead node, the wait is for
            // the membership TTL to pass, and a client should notice the new ring soon after.
            // Past that, every node failing means the cluster itself is out (Redis lost and
            // every node fenced): thousands of clients retrying twice a second are a
            // handshake storm that keeps it down once it is back (10k run, Redis down 10 s),
            // so the wait grows to seconds, jittered over its upper half.
            let cap = if started.elapsed() < FAILOVER_FAST_FOR {
                Duration::from_millis(500)
            } else {
                FAILOVER_SLOW_CAP
            };
            let wait = backoff.min(cap);
            let half = wait.as_millis() as u64 / 2;
            tokio::time::sleep(Duration::from_millis(
                half + rand::random::<u64>() % (half + 1),
            ))
            .await;
            backoff = (backoff * 2).min(cap);
        }
    }

    /// What a failover does once authenticated at the new home: fill the gap, learn the
    /// (changed) ring's members, re-push the sends acked lately.
    async fn after_rehome(&self, overlap_ms: u64) -> Result<(), ClientError> {
        let fill = self.fill_gaps_back(overlap_ms).await;
        // The ring changed: learn its members again, once the gap fill is under way (not
        // before it: one round trip less to being whole).
        self.learned
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.learn_members().await;
        self.repush_recent(fill?);
        Ok(())
    }

    /// Re-homes ahead of the liveness timeout if the current connection is silent (after
    /// [`Event::Silent`]; see `rehome_early_from`). [`Client::supervise`] does this by
    /// itself.
    pub async fn rehome_early(&self) -> Result<(), ClientError> {
        match self.conn() {
            Ok(conn) => self.rehome_early_from(&conn).await,
            Err(_) => Ok(()),
        }
    }

    /// Re-homes ahead of the liveness timeout, make before break, while `old` is silent
    /// ([`ConnectOptions::suspect_after`]): authenticates on a candidate connection to the
    /// home the ring will have without the silent node. That node authenticates this
    /// session only once its ring has dropped the silent one (it died: its registration
    /// expired); until then it redirects back to it, and the attempt asks again on the same
    /// candidate connection (as a failover does); a redirect elsewhere is followed. The
    /// whole attempt takes at most [`SUSPECT_WAIT`] (sends wait for it). The
    /// candidate becomes this client's connection only once authenticated, so nothing else
    /// ever uses a half-made one; the first datagram from the silent node calls the attempt
    /// off (the candidate is closed, `old` stays, no session moves). A slow node thus keeps
    /// its clients; a dead one's clients save the rest of the liveness timeout.
    async fn rehome_early_from(&self, old: &Arc<Conn>) -> Result<(), ClientError> {
        let token = self.session_token()?;
        // Spread over a second, and only if the silence lasts: a busy node's clients go
        // silent together, and most hear it again within that (10k load test: 2,314 of a
        // busy survivor's clients tried another node at once and were called off, adding
        // handshakes to the other busy survivor).
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 1_000)) => {}
            () = old.heard() => return Ok(()),
        }
        let _one = self.failing_over.lock().await;
        if !self.conn().is_ok_and(|now| Arc::ptr_eq(&now, old))
            || !old.is_silent()
            || !old.is_open()
        {
            return Ok(());
        }
        let from = self.server();
        self.suspect(&from);
        let home = match self.predicted_home() {
            Some(home) if home != from => home,
            // Members not known: the liveness timeout, then a failover, decides.
            _ => {
                self.unsuspect(&from);
                return Ok(());
            }
        };
        let started = std::time::Instant::now();
        self.early_attempts
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        debug!(%from, to = %home, "node silent: re-homing ahead of the liveness timeout");
        // Closed if the attempt fails or is called off (dropped half-way included).
        let mut candidate = CloseUnlessKept(None);
        // Bounded as a whole: sends and failovers wait for it (they hold off on the lock).
        let attempt = tokio::time::timeout(
            SUSPECT_WAIT,
            self.authenticate_candidate(&home, &token, &mut candidate),
        );
        let outcome = tokio::select! {
            r = attempt => Some(r.unwrap_or(Err(ClientError::Timeout))),
            () = old.heard() => None,
        };
        match outcome {
            Some(Ok((conn, server, hello, ok))) => {
                if self.is_closing() {
                    return Err(ClientError::Disconnected("client closed".into()));
                }
                candidate.0 = None;
                conn.set_muted(false);
                *self.server.lock() = server;
                *self.hello.lock() = Some(hello);
                *self.conn.lock() = Some(conn);
                old.retire();
                self.accept_session(ok);
                debug!(
                    server = %self.server(),
                    took_ms = started.elapsed().as_millis() as u64,
                    attempt_ms = started.elapsed().as_millis() as u64,
                    early = true,
                    "failed over"
                );
                // A move the ring may have asked for before the silence (a redirect not sent
                // yet: pushes from other nodes went to this new home while the client was
                // not there): read as far back as a redirect's fill does.
                self.after_rehome(RESYNC_OVERLAP_MS).await
            }
            None => {
                self.unsuspect(&from);
                debug!(server = %from, "silent node answered again: early re-home called off");
                Ok(())
            }
            Some(Err(e)) => {
                // A candidate that did not answer is avoided by the failover that may follow
                // (as a failover's own candidates are); the old node, if still open, is not.
                if matches!(e, ClientError::Connect(_) | ClientError::Timeout)
                    || e.code() == Some(ErrorCode::Unavailable)
                {
                    self.suspect(&home);
                }
                if old.is_open() {
                    self.unsuspect(&from);
                }
                debug!(server = %from, error = %e, "early re-home failed");
                Err(e)
            }
        }
    }

    /// Dials `server` (kept, muted, in `slot` until the caller takes it) and authenticates
    /// there with `token`, without making it this client's connection: asks again on it
    /// every 250-500 ms while it redirects to a suspected node (its ring still has it),
    /// follows a redirect to any other node (at most [`MAX_REDIRECTS`]). Returns the
    /// connection, its server, its hello and the grant.
    async fn authenticate_candidate(
        &self,
        server: &str,
        token: &str,
        slot: &mut CloseUnlessKept,
    ) -> Result<(Arc<Conn>, String, pb::HelloOk, pb::AuthOk), ClientError> {
        let mut server = server.to_owned();
        let mut body = client_frame::Body::Authenticate(pb::Authenticate {
            token: token.into(),
        });
        for _ in 0..=MAX_REDIRECTS {
            let conn = Conn::open(&self.endpoint, &server, &self.opts, self.events.clone()).await?;
            // Not this client's connection yet: its closing is no event for the application.
            conn.set_muted(true);
            if let Some(previous) = slot.0.replace(conn.clone()) {
                previous.close();
            }
            let (hello, mut reply) = tokio::join!(
                biased;
                conn.request(self.hello_body()),
                conn.request(body.clone())
            );
            let hello = match hello? {
                server_frame::Body::HelloOk(h) => h,
                other => return Err(unexpected(&other)),
            };
            loop {
                match reply? {
                    server_frame::Body::AuthOk(ok) => return Ok((conn, server, hello, ok)),
                    server_frame::Body::Redirect(r) => {
                        if !r.token.is_empty() {
                            body = client_frame::Body::Authenticate(pb::Authenticate {
                                token: r.token,
                            });
                        }
                        if !self.is_suspect(&r.address) {
                            // Its ring has moved on, and names another home: go there.
                            server = r.address;
                            break;
                        }
                        // Its ring still has the silent node: ask again (the caller bounds
                        // the attempt).
                        let pause = Duration::from_millis(250 + rand::random::<u64>() % 250);
                        tokio::time::sleep(pause).await;
                        reply = conn.request(body.clone()).await;
                    }
                    other => return Err(unexpected(&other)),
                }
            }
        }
        Err(ClientError::Protocol("too many redirects".into()))
    }

    /// Keeps this session connected in the background: whenever its connection ends (the
    /// node died, was declared dead by the liveness check, fenced itself or shut down) it
    /// fails over ([`Client::failover`]); when the node goes silent it tries the new home
    /// ahead of that ([`ConnectOptions::suspect_after`]). Stops when the client is closed or
    /// dropped, or when the session cannot be restored (an expired token).
    pub fn supervise(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let conn = match weak.upgrade().map(|c| c.conn()) {
                    Some(Ok(c)) => c,
                    Some(Err(_)) => {
                        // Between connections: a failover is running elsewhere, or failed.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                    None => return,
                };
                let silent = tokio::select! {
                    biased;
                    () = conn.closed() => false,
                    () = conn.silenced() => true,
                };
                let Some(client) = weak.upgrade() else { return };
                if client.is_closing() {
                    return;
                }
                if silent && conn.is_open() {
                    if let Err(e) = client.rehome_early_from(&conn).await {
                        debug!(error = %e, "early re-home not done; waiting for the node");
                    }
                    drop(client);
                    // Still on the silent node: until it closes or speaks again (one early
                    // attempt per silence).
                    if conn.is_silent() {
                        tokio::select! {
                            () = conn.closed() => {}
                            () = conn.heard() => {}
                        }
                    }
                    continue;
                }
                if let Ok(now) = client.conn()
                    && !Arc::ptr_eq(&now, &conn)
                {
                    continue; // replaced (a redirect followed, a reconnect)
                }
                match client.failover().await {
                    Ok(()) => {}
                    Err(e) if e.is_retryable() => debug!(error = %e, "failover failed; retrying"),
                    Err(e) => {
                        debug!(error = %e, "session cannot be restored; supervisor stops");
                        return;
                    }
                }
            }
        })
    }

    /// Reads every chat forward from its cursor and feeds what it finds to [`Events`]. The
    /// chat list and the pages are read in a background task, and this returns its handle
    /// at once (an error only when there is no open connection): the fill waits for the
    /// application to take events, and must not hold up the caller, who may be the one
    /// reading them. (The chat list was once read here: a caller awaiting it from its event
    /// loop, with the event buffer full of an earlier fill's messages, stopped the reader
    /// that the chat list's reply had to pass, and waited out every retry.) A fill that
    /// could not finish on a live connection, or whose connection closed, asks for another
    /// with [`Event::Resync`], reading as far back.
    pub async fn fill_gaps(&self) -> Result<tokio::task::JoinHandle<()>, ClientError> {
        self.fill_gaps_back(GAP_FILL_OVERLAP_MS).await
    }

    /// The gap fill for `Event::Resync` (a node says pushes meant for this client were
    /// lost): [`Client::fill_gaps`] from [`RESYNC_OVERLAP_MS`] before the newest id seen in
    /// each chat, not 10 s. A lost push can be much older than messages seen since in the
    /// same chat: a node that acked it and was then cut off (a partition) resyncs its
    /// recipients only when its link is back, by which time newer messages of that chat
    /// have arrived by other paths (found by the load test's partition fault at 10k).
    pub async fn resync(&self) -> Result<tokio::task::JoinHandle<()>, ClientError> {
        self.fill_gaps_back(RESYNC_OVERLAP_MS).await
    }

    async fn fill_gaps_back(
        &self,
        overlap_ms: u64,
    ) -> Result<tokio::task::JoinHandle<()>, ClientError> {
        use std::sync::atomic::Ordering;
        // A deeper fill that did not finish is owed: this one reads as far back.
        let overlap_ms = overlap_ms.max(self.owed_depth.swap(0, Ordering::SeqCst));
        let owe = move |depth: &std::sync::atomic::AtomicU64| {
            depth.fetch_max(overlap_ms, Ordering::SeqCst);
        };
        let mut from: HashMap<ChatId, u64> = self.seen.lock().cursors.clone();
        // Ids are taken before the commit, so commits (and pushes) can land slightly out of
        // id order: resume a window before the newest id seen; dedup drops the overlap.
        for cursor in from.values_mut() {
            *cursor = cursor.saturating_sub(overlap_ms << 22);
        }
        // No fill on a closed connection (the failover's or reconnect's fill reads as far
        // back): an error now, as when there is no connection at all.
        let conn = match self.conn() {
            Ok(conn) if conn.is_open() => conn,
            Ok(_) => {
                owe(&self.owed_depth);
                return Err(ClientError::Disconnected("connection closed".into()));
            }
            Err(e) => {
                owe(&self.owed_depth);
                return Err(e);
            }
        };
        let events = self.events.clone();
        let filled = self.gap_fills.clone();
        let owed = self.owed_depth.clone();
        let me = self.me().map_or(0, |u| u.0);
        Ok(tokio::spawn(async move {
            use futures::StreamExt;
            // The chat list carries each chat's newest id (its head): a chat whose head is
            // not past the point a read would start from has nothing to fill. That skips the
            // chats this client has not seen a message of (read from my delivered mark) that
            // did not move; a chat it has seen is always read (its head is at least the
            // newest id seen, past the read's start 10 s before it).
            let rows = match chat_list_retried(&conn).await {
                Ok(rows) => rows,
                Err(e) => {
                    // Without the list there is no fill: owed, and asked for again (after
                    // the retries' backoff) on a live connection the node was too busy to
                    // answer on; a closed one's successor fills as far back.
                    debug!(error = %e, "gap fill: no chat list");
                    owe(&owed);
                    if e.is_retryable() && conn.is_open() {
                        let _ = events.send(Event::Resync).await;
                    }
                    return;
                }
            };
            let mut heads: HashMap<ChatId, u64> = HashMap::new();
            for row in rows {
                if let Ok(chat) = chat_from_wire(row.chat.as_ref()) {
                    from.entry(chat).or_insert(row.my_delivered);
                    if let Some(newest) = &row.newest {
                        heads.insert(chat, newest.message_id);
                    }
                }
            }
            // Chats missing from the list (past its limit, or left) or listed without a
            // newest message (a store that could not read it) keep their read.
            from.retain(|chat, cursor| heads.get(chat).is_none_or(|&head| head > *cursor));
            let (chats, started) = (from.len(), std::time::Instant::now());
            // A few chats at a time: after a failover the reads are round trips to a busy
            // node, and one after another they added up to seconds.
            let ends: Vec<FillEnd> = futures::stream::iter(from)
                .map(|(chat, cursor)| fill_chat(&conn, &events, chat, cursor))
                .buffer_unordered(GAP_FILL_CONCURRENCY)
                .collect()
                .await;
            if ends.contains(&FillEnd::Stopped) {
                // The connection closed under it: the next fill (the failover's, the
                // redirect's, or the one a resync asks for) reads as far back.
                owe(&owed);
                let _ = events.send(Event::Resync).await;
                return;
            }
            let complete = !ends.contains(&FillEnd::Incomplete);
            if complete {
                filled.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            } else {
                // A gap is known and not filled: ask the application for another fill, as
                // a node does when it dropped pushes.
                let _ = events.send(Event::Resync).await;
            }
            debug!(
                user = me,
                chats,
                complete,
                took_ms = started.elapsed().as_millis() as u64,
                "gap filled"
            );
        }))
    }

    /// Sends the messages acked within [`RECENT_SENDS_FOR`] again, same client message ids:
    /// the node pushes each stored message again (its `Processed` says `duplicate`), which
    /// repairs pushes a dead node acked but never sent out. Best effort, one at a time in the
    /// background, each retried a few times; the re-pushed sends are not kept again.
    fn repush_recent(&self, after: tokio::task::JoinHandle<()>) {
        let sends = self.recent.lock().take();
        if sends.is_empty() {
            return;
        }
        let Ok(conn) = self.conn() else { return };
        debug!(
            sends = sends.len(),
            "re-pushing sends acked before the failover"
        );
        // In the background, after this client's own gap fill (`after`): being whole again
        // comes first, and sends waiting for this failover must not wait for it either.
        tokio::spawn(async move {
            let _ = after.await;
            for (_, s) in sends {
                let mut backoff = Duration::from_millis(200);
                for _ in 0..4 {
                    match conn.request(client_frame::Body::Send(s.clone())).await {
                        Ok(_) => break,
                        // Rate limited or busy (the user's send budget may be spent): later.
                        Err(e) if e.is_retryable() && conn.is_open() => {
                            debug!(error = %e, "re-push retried");
                            tokio::time::sleep(backoff).await;
                            backoff *= 2;
                        }
                        Err(e) => {
                            debug!(error = %e, "re-push failed");
                            return;
                        }
                    }
                }
            }
        });
    }

    /// How many sessions nodes granted this client (every login, registration and
    /// re-authentication, a failover's included): a failover has authenticated somewhere
    /// once this grows. Cheap enough to poll for thousands of clients.
    pub fn authentications(&self) -> u64 {
        self.authentications
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// How many early re-homes this client started ([`ConnectOptions::suspect_after`]): how
    /// often its node went silent with a new home to try. Each either moved the session,
    /// was called off when the node spoke again, or failed.
    pub fn early_rehome_attempts(&self) -> u64 {
        self.early_attempts
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// How many gap fills ran to the end (every readable chat read up to its head) since
    /// this client was made: a failover is complete, gap filled, once this grows.
    pub fn gap_fills(&self) -> u64 {
        self.gap_fills.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Sends a message under a new client message id (the time, then random bits); retries
    /// with the same id (so never twice) across disconnects, rate limits and overload,
    /// reconnecting when needed.
    pub async fn send(
        &self,
        chat: ChatId,
        body: impl Into<Bytes>,
        reply_to: Option<u64>,
    ) -> Result<pb::Processed, ClientError> {
        self.send_with_id(chat, body, reply_to, &new_client_msg_id())
            .await
    }

    /// [`Client::send`] with a caller-chosen client message id.
    pub async fn send_with_id(
        &self,
        chat: ChatId,
        body: impl Into<Bytes>,
        reply_to: Option<u64>,
        client_msg_id: &str,
    ) -> Result<pb::Processed, ClientError> {
        let req = client_frame::Body::Send(pb::SendMessage {
            client_msg_id: client_msg_id.to_owned(),
            chat: Some(chat_to_wire(chat)),
            body: body.into(),
            reply_to: reply_to.unwrap_or(0),
        });
        let mut backoff = Duration::from_millis(50);
        let mut last = ClientError::Timeout;
        for attempt in 0..SEND_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            // A failover in progress has a connection that is open but not yet
            // authenticated: wait for it to finish instead of sending on it.
            drop(self.failing_over.lock().await);
            let conn = match self.conn() {
                Ok(c) if c.is_open() => c,
                _ => match self.failover().await {
                    Ok(()) => self.conn()?,
                    Err(e) if e.is_retryable() => {
                        last = e;
                        continue;
                    }
                    Err(e) => return Err(e),
                },
            };
            match conn.request(req.clone()).await {
                Ok(server_frame::Body::Processed(p)) => {
                    // My own message: the node does not push it back to this connection.
                    self.seen.lock().record(Some(chat), p.message_id);
                    if let client_frame::Body::Send(s) = req {
                        self.recent.lock().record(std::time::Instant::now(), s);
                    }
                    return Ok(p);
                }
                Ok(other) => return Err(unexpected(&other)),
                Err(e) if e.is_retryable() => {
                    debug!(error = %e, attempt, "send failed; retrying with the same id");
                    // A timeout on a live connection means a slow node, not a dead one: retry
                    // on the same connection (the node drops the duplicate). Reconnecting
                    // would add a TLS handshake to a node that is already behind, and with
                    // many clients doing it at once a slow node became a reconnect storm
                    // (load test, 100k connections). A dead node is found by the liveness check
                    // (`ConnectOptions::liveness_timeout`), which closes the connection: the
                    // next attempt then fails over.
                    if matches!(e, ClientError::Disconnected(_)) {
                        conn.close();
                    }
                    last = e;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// The 1:1 chat with `peer`.
    pub fn direct_chat(&self, peer: UserId) -> Result<ChatId, ClientError> {
        Ok(ChatId::direct(self.me()?, peer))
    }

    /// Marks messages up to `id` delivered or seen.
    pub async fn mark(
        &self,
        chat: ChatId,
        id: u64,
        kind: pb::ReceiptKind,
    ) -> Result<(), ClientError> {
        match self
            .request(client_frame::Body::Receipt(pb::MarkReceipt {
                chat: Some(chat_to_wire(chat)),
                message_id: id,
                kind: kind as i32,
            }))
            .await?
        {
            server_frame::Body::Done(_) => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Sets my reaction on a message.
    pub async fn react(&self, chat: ChatId, id: u64, emoji: &str) -> Result<(), ClientError> {
        match self
            .request(client_frame::Body::React(pb::React {
                chat: Some(chat_to_wire(chat)),
                message_id: id,
                emoji: emoji.into(),
            }))
            .await?
        {
            server_frame::Body::Done(_) => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Tells the chat's other members I am typing (`true`) or stopped (`false`). While the
    /// user types, call it again every [`crate::typing::REFRESH`]: an indicator expires by
    /// itself at each recipient. Never stored; a refresh sent sooner is answered and not
    /// pushed (see docs/PROTOCOL.md, "Typing").
    pub async fn typing(&self, chat: ChatId, typing: bool) -> Result<(), ClientError> {
        match self
            .request(client_frame::Body::Typing(pb::Typing {
                chat: Some(chat_to_wire(chat)),
                typing,
            }))
            .await?
        {
            server_frame::Body::Done(_) => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// The presence of my contacts (the users I share a 1:1 chat with), ascending by id, at
    /// most 1,000. Changes come as [`crate::Event::Presence`].
    pub async fn presence(&self) -> Result<Vec<pb::PresenceState>, ClientError> {
        match self
            .request(client_frame::Body::Presence(pb::PresenceQuery {}))
            .await?
        {
            server_frame::Body::Presence(p) => Ok(p.users),
            other => Err(unexpected(&other)),
        }
    }

    /// Hides my presence (`true`: this client never shows me online) or shows it again, on
    /// the live connection and every one after it.
    pub async fn set_presence_hidden(&self, hidden: bool) -> Result<(), ClientError> {
        self.hidden
            .store(hidden, std::sync::atomic::Ordering::Relaxed);
        match self
            .request(client_frame::Body::SetPresence(pb::SetPresence { hidden }))
            .await?
        {
            server_frame::Body::Done(_) => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    fn hello_body(&self) -> client_frame::Body {
        hello_body(self.hidden.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Removes my reaction.
    pub async fn unreact(&self, chat: ChatId, id: u64) -> Result<(), ClientError> {
        match self
            .request(client_frame::Body::Unreact(pb::Unreact {
                chat: Some(chat_to_wire(chat)),
                message_id: id,
            }))
            .await?
        {
            server_frame::Body::Done(_) => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// One page of history (`cursor` 0 = from the end the direction starts at; `limit` 0 =
    /// the node's default).
    pub async fn history(
        &self,
        chat: ChatId,
        cursor: u64,
        direction: pb::Direction,
        limit: u32,
    ) -> Result<pb::HistoryPage, ClientError> {
        match self
            .request(client_frame::Body::History(pb::HistoryQuery {
                chat: Some(chat_to_wire(chat)),
                cursor,
                direction: direction as i32,
                limit,
            }))
            .await?
        {
            server_frame::Body::HistoryPage(p) => Ok(p),
            other => Err(unexpected(&other)),
        }
    }

    /// My chats, most recently active first.
    pub async fn chat_list(&self) -> Result<Vec<pb::ChatSummary>, ClientError> {
        chat_list_on(&*self.conn()?).await
    }

    /// A user by name.
    pub async fn resolve_user(&self, name: &str) -> Result<pb::UserInfo, ClientError> {
        self.resolve(pb::ResolveUser {
            user_name: name.into(),
            user_id: 0,
        })
        .await
    }

    /// A user by id.
    pub async fn user_by_id(&self, id: UserId) -> Result<pb::UserInfo, ClientError> {
        self.resolve(pb::ResolveUser {
            user_name: String::new(),
            user_id: id.0,
        })
        .await
    }

    async fn resolve(&self, q: pb::ResolveUser) -> Result<pb::UserInfo, ClientError> {
        match self.request(client_frame::Body::ResolveUser(q)).await? {
            server_frame::Body::User(u) => Ok(u),
            other => Err(unexpected(&other)),
        }
    }

    /// Creates a public channel (I become its owner and first member): anyone who names it
    /// may join and read its history.
    pub async fn channel_create(&self, name: &str) -> Result<pb::ChannelInfo, ClientError> {
        self.channel_create_with(name, pb::ChannelVisibility::Public)
            .await
    }

    /// Creates a private (invite-only) channel: members join when I or an admin add them.
    pub async fn channel_create_private(&self, name: &str) -> Result<pb::ChannelInfo, ClientError> {
        self.channel_create_with(name, pb::ChannelVisibility::Private)
            .await
    }

    async fn channel_create_with(
        &self,
        name: &str,
        visibility: pb::ChannelVisibility,
    ) -> Result<pb::ChannelInfo, ClientError> {
        match self
            .request(client_frame::Body::ChannelCreate(pb::ChannelCreate {
                name: name.into(),
                visibility: visibility as i32,
            }))
            .await?
        {
            server_frame::Body::Channel(c) => Ok(c),
            other => Err(unexpected(&other)),
        }
    }

    /// Adds `user` to a channel I own or administer.
    pub async fn channel_add_member(
        &self,
        id: ChannelId,
        user: UserId,
    ) -> Result<pb::ChannelInfo, ClientError> {
        match self
            .request(client_frame::Body::ChannelAdd(pb::ChannelAddMember {
                channel_id: id.0,
                user_id: user.0,
            }))
            .await?
        {
            server_frame::Body::Channel(c) => Ok(c),
            other => Err(unexpected(&other)),
        }
    }

    /// Removes member `user` from a channel I own or administer.
    pub async fn channel_remove_member(
        &self,
        id: ChannelId,
        user: UserId,
    ) -> Result<(), ClientError> {
        match self
            .request(client_frame::Body::ChannelRemove(pb::ChannelRemoveMember {
                channel_id: id.0,
                user_id: user.0,
            }))
            .await?
        {
            server_frame::Body::Done(_) => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Makes member `user` an admin of a channel I own (`admin`), or a plain member again.
    pub async fn channel_set_admin(
        &self,
        id: ChannelId,
        user: UserId,
        admin: bool,
    ) -> Result<(), ClientError> {
        match self
            .request(client_frame::Body::ChannelSetAdmin(pb::ChannelSetAdmin {
                channel_id: id.0,
                user_id: user.0,
                admin,
            }))
            .await?
        {
            server_frame::Body::Done(_) => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Joins a channel by name.
    pub async fn channel_join(&self, name: &str) -> Result<pb::ChannelInfo, ClientError> {
        match self
            .request(client_frame::Body::ChannelJoin(pb::ChannelJoin {
                channel_id: 0,
                name: name.into(),
            }))
            .await?
        {
            server_frame::Body::Channel(c) => Ok(c),
            other => Err(unexpected(&other)),
        }
    }

    /// Leaves a channel.
    pub async fn channel_leave(&self, id: ChannelId) -> Result<(), ClientError> {
        match self
            .request(client_frame::Body::ChannelLeave(pb::ChannelLeave {
                channel_id: id.0,
            }))
            .await?
        {
            server_frame::Body::Done(_) => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// One page of the channels I am in, ascending by id: those above `after`
    /// (`ChannelId(0)`: from the start), at most `limit` (0: the node's default). The reply's
    /// `next_cursor` is the `after` of the next page, 0 after the last.
    pub async fn channel_list_page(
        &self,
        after: ChannelId,
        limit: u32,
    ) -> Result<pb::ChannelList, ClientError> {
        match self
            .request(client_frame::Body::ChannelList(pb::ChannelListMine {
                limit,
                after_channel_id: after.0,
            }))
            .await?
        {
            server_frame::Body::Channels(l) => Ok(l),
            other => Err(unexpected(&other)),
        }
    }

    /// Every channel I am in, ascending by id (walks all pages).
    pub async fn channel_list(&self) -> Result<Vec<pb::ChannelInfo>, ClientError> {
        walk_pages(|after| async move {
            let p = self.channel_list_page(ChannelId(after), 0).await?;
            Ok((p.channels, p.next_cursor))
        })
        .await
    }

    /// A channel of mine by name.
    pub async fn my_channel(&self, name: &str) -> Result<pb::ChannelInfo, ClientError> {
        let name = name.trim_start_matches('#');
        self.channel_list()
            .await?
            .into_iter()
            .find(|c| c.name == name)
            .ok_or_else(|| ClientError::Server {
                code: ErrorCode::UnknownChannel,
                message: format!("you are not in a channel named {name:?}"),
            })
    }

    /// One page of the members of a channel I am in, ascending by user id: those above
    /// `after` (`UserId(0)`: from the start), at most `limit` (0: the node's default). The
    /// reply's `next_cursor` is the `after` of the next page, 0 after the last.
    pub async fn channel_members_page(
        &self,
        id: ChannelId,
        after: UserId,
        limit: u32,
    ) -> Result<pb::MemberList, ClientError> {
        match self
            .request(client_frame::Body::ChannelMembers(pb::ChannelMembers {
                channel_id: id.0,
                limit,
                after_user_id: after.0,
            }))
            .await?
        {
            server_frame::Body::Members(m) => Ok(m),
            other => Err(unexpected(&other)),
        }
    }

    /// Every member of a channel I am in, ascending by user id (walks all pages).
    pub async fn channel_members(&self, id: ChannelId) -> Result<Vec<pb::UserInfo>, ClientError> {
        walk_pages(|after| async move {
            let p = self.channel_members_page(id, UserId(after), 0).await?;
            Ok((p.members, p.next_cursor))
        })
        .await
    }

    /// Which node is `name`'s home.
    pub async fn where_is(&self, name: &str) -> Result<pb::UserHome, ClientError> {
        match self
            .request(client_frame::Body::WhereIs(pb::WhereIs {
                user_name: name.into(),
            }))
            .await?
        {
            server_frame::Body::UserHome(h) => Ok(h),
            other => Err(unexpected(&other)),
        }
    }

    /// A round trip to the node (`Ping`/`Pong`); returns how long it took.
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        let nonce = rand::random::<u64>();
        let start = std::time::Instant::now();
        match self
            .request(client_frame::Body::Ping(pb::Ping { nonce }))
            .await?
        {
            server_frame::Body::Pong(p) if p.nonce == nonce => Ok(start.elapsed()),
            other => Err(unexpected(&other)),
        }
    }

    /// The cluster's members and ring epoch, as the connected node sees them.
    pub async fn cluster(&self) -> Result<pb::ClusterInfo, ClientError> {
        match self
            .request(client_frame::Body::Cluster(pb::ClusterQuery {}))
            .await?
        {
            server_frame::Body::Cluster(c) => Ok(c),
            other => Err(unexpected(&other)),
        }
    }

    /// The QUIC endpoint this client's connections use. A process about to exit closes it
    /// and waits for it to go idle (`Endpoint::wait_idle`, bounded): the node then learns at
    /// once that the connection is gone, instead of counting it until its idle timeout.
    pub fn endpoint(&self) -> quinn::Endpoint {
        self.endpoint.clone()
    }

    /// Moves this client to another local UDP socket (a phone going from Wi-Fi to cellular)
    /// without reconnecting: QUIC connection migration. The connection, its session, the
    /// sequence of its pushes and the requests in flight carry on; the node validates the
    /// new path before it sends more there than a little. The node learns the new address
    /// from the next packet: call [`Client::ping`] if nothing else is about to be sent.
    pub fn rebind(&self, socket: std::net::UdpSocket) -> Result<(), ClientError> {
        self.endpoint
            .rebind(socket)
            .map_err(|e| ClientError::Setup(format!("rebinding the client's socket: {e}")))
    }

    /// Closes the connection (and stops a supervisor).
    pub fn close(&self) {
        self.closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Ok(c) = self.conn() {
            c.close();
        }
    }
}

/// Collects every row of a cursor-paged list: `page(after)` returns one page's rows and the
/// next cursor (0 after the last page). A cursor that does not move forwards ends the walk
/// (a misbehaving node cannot loop it).
async fn walk_pages<T, F, Fut>(mut page: F) -> Result<Vec<T>, ClientError>
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, u64), ClientError>>,
{
    let mut out = Vec::new();
    let mut after = 0u64;
    loop {
        let (rows, next) = page(after).await?;
        out.extend(rows);
        if next <= after {
            return Ok(out);
        }
        after = next;
    }
}

#[cfg(test)]
mod tests {
    use super::client_msg_id_at;

    #[test]
    fn client_msg_ids_sort_by_time_whatever_their_random_bits() {
        let t = 1_796_000_000_000; // 2026-11
        let late_small = client_msg_id_at(t + 1, 0);
        let early_large = client_msg_id_at(t, u128::MAX);
        assert!(early_large < late_small, "{early_large} !< {late_small}");
        for id in [&late_small, &early_large] {
            assert_eq!(id.len(), 32, "{id}");
            assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        }
        assert_eq!(&early_large[..12], "01a229f12800");
        assert_eq!(&early_large[12..], "ffffffffffffffffffff");
        assert_ne!(client_msg_id_at(t, 1), client_msg_id_at(t, 2));
    }
}
