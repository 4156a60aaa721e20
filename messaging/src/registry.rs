//! The connection registry: user -> live connections on this node, and the push path into
//! each connection's bounded outbound queue.
//!
//! A push is encoded once (a `Push` body without its sequence number) and the same `Bytes`
//! goes to every recipient connection; each connection task adds its own sequence number when
//! it writes the frame. A connection whose queue is full is a slow reader: it is closed with
//! `SLOW_READER` right away (its client reconnects and fills the gap from history), so a slow
//! reader never makes the node buffer more than `outbound_queue` pushes for it.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use dashmap::DashMap;
use meshchat_idgen::UserId;
use meshchat_proto::client::ErrorCode;
use tokio::sync::mpsc;
use tracing::debug;

use crate::error::close_code;

/// A connection's id, unique within a node's lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// What the registry holds per live connection.
#[derive(Debug, Clone)]
pub struct ConnHandle {
    /// The connection's id.
    pub id: ConnId,
    /// Its outbound push queue (pre-encoded `Push` bodies without `seq`).
    pub tx: mpsc::Sender<Bytes>,
    /// The QUIC connection, to close a slow reader.
    pub conn: quinn::Connection,
}

/// Outcome counts of one fan-out, for metrics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Connections the push was queued on.
    pub queued: usize,
    /// Connections cut off as slow readers.
    pub cut_off: usize,
}

/// user -> live connections on this node.
#[derive(Debug, Default)]
pub struct Registry {
    users: DashMap<UserId, Vec<ConnHandle>>,
    next_conn: AtomicU64,
    live: AtomicU64,
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
        self.users.entry(user).or_default().push(handle);
        self.live.fetch_add(1, Ordering::Relaxed);
    }

    /// Removes a connection; drops the user's entry when it was the last.
    pub fn remove(&self, user: UserId, id: ConnId) {
        let mut removed = false;
        // The closure edits the entry in place whether or not it is then removed.
        self.users.remove_if_mut(&user, |_, conns| {
            let before = conns.len();
            conns.retain(|c| c.id != id);
            removed = conns.len() < before;
            conns.is_empty()
        });
        if removed {
            self.live.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Authenticated connections registered now.
    pub fn live_connections(&self) -> u64 {
        self.live.load(Ordering::Relaxed)
    }

    /// Whether `user` has a live connection here.
    pub fn is_online(&self, user: UserId) -> bool {
        self.users.contains_key(&user)
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
                match c.tx.try_send(push.clone()) {
                    Ok(()) => d.queued += 1,
                    Err(mpsc::error::TrySendError::Full(_)) => slow.push(c.clone()),
                    // The connection task is ending; it removes itself.
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            }
        }
        // Close outside the map's shard lock.
        for c in slow {
            debug!(
                conn = c.id.0,
                "outbound queue full: cutting off slow reader"
            );
            c.conn.close(
                close_code(ErrorCode::SlowReader),
                b"outbound queue full: reconnect and fill the gap from history",
            );
            d.cut_off += 1;
        }
        d
    }

    /// Every live connection (for shutdown).
    pub fn all(&self) -> Vec<ConnHandle> {
        self.users.iter().flat_map(|e| e.value().clone()).collect()
    }
}
