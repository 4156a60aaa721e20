//! The connection registry: user -> live connections on this node, and the push path into
//! each connection's bounded outbound queue.
//!
//! A push is encoded once (a `Push` body without its sequence number) and the same `Bytes`
//! goes to every recipient connection; each connection task adds its own sequence number when
//! it writes the frame. A connection whose queue is full is a slow reader: it is closed with
//! `SLOW_READER` right away (its client reconnects and fills the gap from history), so a slow
//! reader never makes the node buffer more than `outbound_queue` pushes or
//! `outbound_queue_bytes` bytes of them (or one push) for it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use dashmap::DashMap;
use meshchat_backplane::bounded::Bounded;
use meshchat_backplane::membership_redis::ClientConnections;
use meshchat_idgen::UserId;
use meshchat_proto::client::ErrorCode;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tracing::debug;

use crate::error::close_code;

// Shared with the mesh, which passes them through (`meshchat_backplane::delivery`).
pub use meshchat_backplane::delivery::{ConnId, Delivery};

/// A connection's bounded outbound push queue: the node's one bounded queue
/// ([`meshchat_backplane::bounded::Bounded`], a mesh peer's envelope queue too) under a lock,
/// with the connection's waking.
///
/// Written for idle memory: a tokio `mpsc` channel allocates a 32-slot block up front (~1 KiB
/// per connection with `Bytes` items, measured with heaptrack); an empty queue allocates
/// nothing, so an idle connection pays ~100 bytes here. Pushes are rare per connection, so a
/// short lock per push costs nothing measurable.
#[derive(Debug)]
pub struct Outbox {
    queue: Mutex<Bounded<Bytes>>,
    ready: Notify,
    /// Rung instead of `ready` for a connection served by the endpoint loop.
    bell: Option<Arc<meshchat_edge::Bell>>,
}

/// Why a push was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// The queue holds its most pushes or bytes: the reader is too slow.
    Full,
}

impl Outbox {
    /// An empty queue holding at most `capacity` pushes and `capacity_bytes` bytes of them.
    pub fn new(capacity: usize, capacity_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            queue: Mutex::new(Bounded::new(capacity, capacity_bytes)),
            ready: Notify::new(),
            bell: None,
        })
    }

    /// The same, whose pushes ring `bell` (a connection of the endpoint loop: it drains the
    /// queue when woken).
    pub fn ringing(
        capacity: usize,
        capacity_bytes: usize,
        bell: Arc<meshchat_edge::Bell>,
    ) -> Arc<Self> {
        Arc::new(Self {
            queue: Mutex::new(Bounded::new(capacity, capacity_bytes)),
            ready: Notify::new(),
            bell: Some(bell),
        })
    }

    /// Queues a push, or refuses when full.
    pub fn try_push(&self, push: Bytes) -> Result<(), PushError> {
        self.queue
            .lock()
            .try_push(push.len(), push)
            .map_err(|_| PushError::Full)?;
        match &self.bell {
            Some(bell) => bell.ring(),
            // Stores a permit when nobody waits, so a push is never missed.
            None => self.ready.notify_one(),
        }
        Ok(())
    }

    /// Takes up to `max` queued pushes (without waiting).
    pub fn drain_into(&self, max: usize, out: &mut Vec<Bytes>) {
        self.queue.lock().drain_into(max, out);
    }

    /// Waits until a push may be queued (cancel-safe).
    pub async fn wait(&self) {
        if !self.queue.lock().is_empty() {
            return;
        }
        self.ready.notified().await;
    }
}

/// A way to close a client connection from outside its session, whichever endpoint serves
/// it.
#[derive(Debug, Clone)]
pub enum ConnControl {
    /// A connection of quinn's async endpoint.
    Quinn(quinn::Connection),
    /// A connection of meshchat's endpoint loop (`transport.endpoint = "loop"`).
    Loop(Arc<meshchat_edge::Bell>),
}

impl ConnControl {
    /// Closes the connection with `code` and `reason`.
    pub fn close(&self, code: ErrorCode, reason: &[u8]) {
        match self {
            ConnControl::Quinn(c) => c.close(close_code(code), reason),
            ConnControl::Loop(b) => b.close(close_code(code).into_inner() as u32, reason),
        }
    }

    /// Whether it is closed (or a close was asked for).
    pub fn is_closed(&self) -> bool {
        match self {
            ConnControl::Quinn(c) => c.close_reason().is_some(),
            ConnControl::Loop(b) => b.is_closed(),
        }
    }
}

/// What the registry holds per live connection.
#[derive(Debug, Clone)]
pub struct ConnHandle {
    /// The connection's id.
    pub id: ConnId,
    /// Its outbound push queue (pre-encoded `Push` bodies without `seq`).
    pub outbox: Arc<Outbox>,
    /// The connection, to close a slow reader.
    pub conn: ConnControl,
    /// Whether it shows its user online (authenticated, handshake complete, not hidden):
    /// counted by the presence tracker while it is registered.
    pub visible: bool,
}

/// Why [`Registry::insert_capped`] refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The user has this many connections here, the most allowed.
    Cap(usize),
    /// The user signed out after this login.
    SignedOut,
}

/// user -> live connections on this node.
#[derive(Debug, Default)]
pub struct Registry {
    users: DashMap<UserId, Vec<ConnHandle>>,
    /// Per user who signed out (everywhere, or by a password change) while this node ran:
    /// logins before this time (Unix ms) are not let in, even if their authentication read
    /// the store before the sign-out was written.
    floors: DashMap<UserId, u64>,
    next_conn: AtomicU64,
    live: AtomicU64,
    /// Connections cut off by a full outbound queue, since start.
    cut_off: AtomicU64,
    /// Users' visible connections here, and the presence changes due (updated under the
    /// user's entry lock, so a user's connects and disconnects reach it in order).
    tracker: Mutex<crate::presence::Tracker>,
    /// The cluster's presence as this node knows it.
    book: crate::presence::Book,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// A fresh connection id.
    pub fn next_conn_id(&self) -> ConnId {
        ConnId(self.next_conn.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// Adds an authenticated connection of `user`.
    pub fn insert(&self, user: UserId, handle: ConnHandle) {
        let mut conns = self.users.entry(user).or_default();
        if handle.visible {
            self.tracker.lock().connected(user, crate::auth::now_ms());
        }
        conns.push(handle);
        drop(conns);
        self.live.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds an authenticated connection of `user`, whose login was at `auth_time_ms`, unless
    /// the user already has `cap` here or signed out after that login. Checked and added
    /// under the user's entry lock: concurrent authentications never pass the cap together,
    /// and one racing a sign-out is either refused here or closed by it.
    pub fn insert_capped(
        &self,
        user: UserId,
        handle: ConnHandle,
        cap: usize,
        auth_time_ms: u64,
    ) -> Result<(), Refused> {
        let refused = {
            let mut conns = self.users.entry(user).or_default();
            if self.floors.get(&user).is_some_and(|f| auth_time_ms < *f) {
                Some(Refused::SignedOut)
            } else if conns.len() >= cap.max(1) {
                Some(Refused::Cap(conns.len()))
            } else {
                if handle.visible {
                    self.tracker.lock().connected(user, crate::auth::now_ms());
                }
                conns.push(handle);
                None
            }
        };
        if let Some(refused) = refused {
            // A refused first connection leaves no empty entry (the user is not online here).
            self.users.remove_if(&user, |_, conns| conns.is_empty());
            return Err(refused);
        }
        self.live.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Signs `user` out of every login before `floor_ms` on this node: closes their
    /// connections here but `except` with `code`, and keeps later authentications of such
    /// logins out. Returns how many were closed.
    pub fn sign_out(
        &self,
        user: UserId,
        floor_ms: u64,
        except: Option<ConnId>,
        code: ErrorCode,
        reason: &[u8],
    ) -> usize {
        // The floor first, then the connections: an authentication racing this either sees
        // the floor (refused) or is registered before the connections are read (closed).
        self.floors
            .entry(user)
            .and_modify(|f| *f = (*f).max(floor_ms))
            .or_insert(floor_ms);
        self.close_user(user, except, code, reason)
    }

    /// Removes a connection; drops the user's entry when it was the last.
    pub fn remove(&self, user: UserId, id: ConnId) {
        let mut removed = false;
        // The closure edits the entry in place whether or not it is then removed.
        self.users.remove_if_mut(&user, |_, conns| {
            if let Some(i) = conns.iter().position(|c| c.id == id) {
                if conns.swap_remove(i).visible {
                    self.tracker.lock().disconnected(
                        user,
                        std::time::Instant::now(),
                        crate::auth::now_ms(),
                    );
                }
                removed = true;
            }
            conns.is_empty()
        });
        if removed {
            self.live.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Shows (`visible`) or hides connection `id` of `user` in the user's presence; `false`
    /// if it is not registered.
    pub fn set_visible(&self, user: UserId, id: ConnId, visible: bool) -> bool {
        let Some(mut conns) = self.users.get_mut(&user) else {
            return false;
        };
        let Some(c) = conns.iter_mut().find(|c| c.id == id) else {
            return false;
        };
        if c.visible != visible {
            c.visible = visible;
            let mut t = self.tracker.lock();
            if visible {
                t.connected(user, crate::auth::now_ms());
            } else {
                t.disconnected(user, std::time::Instant::now(), crate::auth::now_ms());
            }
        }
        true
    }

    /// The presence changes of this node's users due at `now`, marked published.
    pub fn presence_due(&self, now: std::time::Instant) -> Vec<crate::presence::PresenceChange> {
        self.tracker.lock().due(now)
    }

    /// Every user this node shows online (a peer's presence snapshot).
    pub fn presence_online(&self) -> Vec<crate::presence::PresenceChange> {
        self.tracker.lock().online()
    }

    /// Connections of `user` here that show them online.
    pub fn visible_connections(&self, user: UserId) -> u32 {
        self.tracker.lock().devices(user)
    }

    /// The cluster's presence as this node knows it.
    pub fn presence(&self) -> &crate::presence::Book {
        &self.book
    }

    /// Authenticated connections registered now.
    pub fn live_connections(&self) -> u64 {
        self.live.load(Ordering::Relaxed)
    }

    /// How many live connections `user` has here.
    pub fn connections_of(&self, user: UserId) -> usize {
        self.users.get(&user).map_or(0, |conns| conns.len())
    }

    /// Whether `user` has a live connection here.
    pub fn is_online(&self, user: UserId) -> bool {
        self.users.contains_key(&user)
    }

    /// Every user with a live connection here (for re-homing after a ring change).
    pub fn users(&self) -> Vec<UserId> {
        self.users.iter().map(|e| *e.key()).collect()
    }

    /// Queues `push` on every live connection of every user in `users`, except `skip`.
    pub fn push_to(&self, users: &[UserId], push: &Bytes, skip: Option<ConnId>) -> Delivery {
        let mut d = Delivery::default();
        let mut slow: Vec<ConnHandle> = Vec::new();
        for user in users {
            let Some(conns) = self.users.get(user) else {
                continue;
            };
            for c in conns.iter() {
                if Some(c.id) == skip {
                    continue;
                }
                match c.outbox.try_push(push.clone()) {
                    Ok(()) => d.queued += 1,
                    Err(PushError::Full) => slow.push(c.clone()),
                }
            }
        }
        // Close outside the map's shard lock.
        for c in slow {
            // Until its session ends, a cut-off connection stays registered and refuses every
            // push: count (and log) it once.
            if c.conn.is_closed() {
                continue;
            }
            debug!(
                conn = c.id.0,
                "outbound queue full: cutting off slow reader"
            );
            c.conn.close(
                ErrorCode::SlowReader,
                b"outbound queue full: reconnect and fill the gap from history",
            );
            d.cut_off += 1;
        }
        if d.cut_off > 0 {
            self.cut_off.fetch_add(d.cut_off as u64, Ordering::Relaxed);
        }
        d
    }

    /// Connections cut off as slow readers (a full outbound queue) since start.
    pub fn cut_off_total(&self) -> u64 {
        self.cut_off.load(Ordering::Relaxed)
    }

    /// Every live connection (for shutdown).
    pub fn all(&self) -> Vec<ConnHandle> {
        self.users.iter().flat_map(|e| e.value().clone()).collect()
    }

    /// Closes every connection of `user` here but `except`, with `code` and `reason`;
    /// returns how many.
    pub fn close_user(
        &self,
        user: UserId,
        except: Option<ConnId>,
        code: ErrorCode,
        reason: &[u8],
    ) -> usize {
        let conns: Vec<ConnHandle> = self
            .users
            .get(&user)
            .map(|c| c.iter().filter(|h| Some(h.id) != except).cloned().collect())
            .unwrap_or_default();
        for c in &conns {
            c.conn.close(code, reason);
        }
        conns.len()
    }
}

impl ClientConnections for Registry {
    fn close_all_fenced(&self) -> usize {
        let conns = self.all();
        for c in &conns {
            c.conn.close(
                ErrorCode::Unavailable,
                b"node fenced: cut off from cluster membership",
            );
        }
        conns.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn outbox_is_bounded_and_wakes_its_reader() {
        let o = Outbox::new(2, 1024);
        assert_eq!(o.try_push(Bytes::from_static(b"a")), Ok(()));
        assert_eq!(o.try_push(Bytes::from_static(b"b")), Ok(()));
        assert_eq!(o.try_push(Bytes::from_static(b"c")), Err(PushError::Full));
        o.wait().await;
        let mut got = Vec::new();
        o.drain_into(10, &mut got);
        assert_eq!(
            got,
            vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")]
        );
        // A push made while nobody waits is not lost.
        let o2 = o.clone();
        let waiter = tokio::spawn(async move {
            o2.wait().await;
            let mut v = Vec::new();
            o2.drain_into(10, &mut v);
            v
        });
        o.try_push(Bytes::from_static(b"d")).expect("room");
        let v = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("task");
        assert_eq!(v, vec![Bytes::from_static(b"d")]);

        // Bounded in bytes too: a few large pushes fill it before its count does.
        let o = Outbox::new(10, 5);
        assert_eq!(o.try_push(Bytes::from_static(b"abc")), Ok(()));
        assert_eq!(o.try_push(Bytes::from_static(b"def")), Err(PushError::Full));
        assert_eq!(o.try_push(Bytes::from_static(b"gh")), Ok(()));
    }
}
