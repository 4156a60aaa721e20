//! The node <-> node QUIC mesh with static membership, and the [`Router`] that uses it.
//!
//! - **Ring**: every member builds the same consistent-hash ring from the static member list
//!   (`[cluster]` in the config); a user's home is the ring owner of their id.
//! - **Links**: one QUIC connection per pair of nodes. The lower node id dials, the higher
//!   accepts, so two nodes never dial each other at once. Mutual TLS: both sides present a
//!   certificate signed by the cluster CA and verify the other's; a node without one is
//!   refused in the handshake. The dialer then sends `PeerHello` (cluster id, node id,
//!   protocol version) and the acceptor answers `PeerHelloOk` or closes.
//! - **Batching and bounds**: each peer has a bounded envelope queue; a writer task drains it
//!   into `PeerBatch` frames (up to 1,024 envelopes or 64 KiB each), so under load many
//!   messages share one frame and packet. A full queue drops the new envelope and counts it.
//!   A delivery to many users of one peer (a large channel) is split into envelopes of at
//!   most 256 KiB, and the queue refuses a larger envelope (resyncing its recipients), so a
//!   batch always fits the 1 MiB mesh frame.
//! - **Reconnect**: the dialer retries with jittered exponential backoff (100 ms .. 5 s).
//!
//! ## What happens to an in-flight envelope
//!
//! Envelopes carry live pushes only; every message they announce is already durable (the send
//! path acks after the commit, and pushes after that). An envelope queued for a peer whose link
//! is down waits in the queue and is sent when the link returns; if the queue is full it is
//! dropped (counted in [`PeerStats::dropped`]) and its recipients are remembered (up to 8,192
//! users, else "everyone"): ahead of its next batch the peer gets a `Resync` naming them,
//! outside the queue's bound, and pushes `Resync` to their connections so the clients fill
//! the gap from history while online. Channel member changes (`ChannelChanged`) are not in
//! the queue: they wait on a lane of their own, coalesced per channel, and go ahead of the
//! next batch, so they are never dropped; a link that comes up drops the cached member lists
//! (a change written into the link it replaces may have been lost). A batch whose write fails, or whose link is
//! replaced or stopped mid-write, goes back to the front of the queue (receivers may then see
//! an envelope twice; clients drop message ids they have). A write that completed only put
//! the batch into QUIC's send buffer: if the link dies before the peer acknowledged it, the
//! batch is gone, and QUIC does not say which frames arrived. So each link remembers the
//! recipients of the batches it wrote within the last [`RESYNC_WINDOW`] (bounded like the
//! missed set: past [`MAX_MISSED_USERS`] it becomes "everyone"), and when the link ends
//! (failed, closed, timed out, or replaced by a new hello) they join the missed set: the next
//! link's first batch carries a `Resync` for them, and their clients fill the gap while
//! online. A peer that says hello again (a restart, or a new connection while the old one is
//! not yet known dead) replaces its old link at once: the old link stops taking envelopes
//! from the queue, so none is written into a dead connection. A receiver that no longer owns a recipient (its ring moved on)
//! delivers to that recipient's connections it still has and forwards the rest to the owner it
//! knows, once (`hops` bounds it).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use meshchat_idgen::{ChannelId, NodeId, UserId};
use meshchat_proto::codec::encode_into;
use meshchat_proto::mesh::{self as pm, envelope};
use meshchat_proto::{FrameCodec, MESH_ALPN, PROTOCOL_VERSION};
use parking_lot::{Mutex, RwLock};
use rustls_pki_types::CertificateDer;
use tokio::sync::{Notify, watch};
use tokio_util::codec::FramedRead;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::delivery::{ConnId, Delivery, Home, LocalDelivery, MemberView, Router};
use crate::fanout;
use crate::ring::{DEFAULT_VNODES_PER_WEIGHT, Ring};
use crate::tls::{self, Identity};

/// Largest mesh frame (a batch).
const MAX_MESH_FRAME: usize = 1 << 20;
/// Most envelopes in one batch.
const BATCH_ENVELOPES: usize = 1_024;
/// Batch size at which the writer stops adding envelopes.
const BATCH_BYTES: usize = 64 * 1024;
/// Forwarding bound for envelopes that reach a node that no longer owns their recipients.
const MAX_HOPS: u32 = 1;
/// Users remembered per peer whose envelopes were dropped; past it the resync covers every
/// connection on the peer.
const MAX_MISSED_USERS: usize = 8_192;
/// Largest envelope a peer queue takes. A delivery to more recipients than fit is split into
/// several envelopes ([`deliver_envelopes`]); an envelope still larger (a push bigger than
/// this) is refused at the queue and its recipients resynced, so it can never make a batch
/// frame too large and take the batch's other envelopes with it.
const MAX_ENVELOPE_BYTES: usize = 256 * 1024;
/// Bytes of one recipient in a `Deliver` (a varint u64 is at most 10).
const RECIPIENT_BYTES: usize = 10;

// A batch stops adding envelopes once past BATCH_BYTES, so the largest batch is that, one
// largest envelope, a resync naming MAX_MISSED_USERS users, the channel-change lane, and the
// per-envelope framing: always under the frame limit.
const _: () = assert!(
    BATCH_BYTES
        + MAX_ENVELOPE_BYTES
        + MAX_MISSED_USERS * RECIPIENT_BYTES
        + MAX_CHANGED_CHANNELS * 16
        + BATCH_ENVELOPES * 8
        < MAX_MESH_FRAME
);

/// The `Deliver` envelopes of `push` to `recipients` (all on one peer): as many as it takes
/// to keep each under [`MAX_ENVELOPE_BYTES`]. A channel with 100k+ members on one node made
/// one envelope larger than a mesh frame, and the whole batch around it was dropped.
fn deliver_envelopes(
    epoch: u64,
    hops: u32,
    recipients: Vec<u64>,
    push: &Bytes,
) -> impl Iterator<Item = pm::Envelope> + '_ {
    // Room for recipients once the push and the envelope's own fields are in.
    let per_envelope =
        (MAX_ENVELOPE_BYTES.saturating_sub(push.len() + 64) / RECIPIENT_BYTES).max(1);
    let chunks: Vec<Vec<u64>> = if recipients.len() <= per_envelope {
        vec![recipients]
    } else {
        recipients
            .chunks(per_envelope)
            .map(<[u64]>::to_vec)
            .collect()
    };
    chunks.into_iter().map(move |recipients| pm::Envelope {
        ring_epoch: epoch,
        hops,
        body: Some(envelope::Body::Deliver(pm::Deliver {
            recipients,
            push: push.clone(),
        })),
    })
}

/// Channels waiting on a peer's lane before one `ChannelChanged{all}` replaces them.
const MAX_CHANGED_CHANNELS: usize = 4_096;

/// Member-list invalidations owed to a peer: a lane that is never dropped. Sent ahead of the
/// next batch, outside the queue's bound, coalesced per channel. (Through the droppable
/// queue, one lost invalidation left a stale fan-out list, or cost a resync of every user
/// on the peer.)
#[derive(Debug, Default)]
struct Changed {
    channels: BTreeSet<u64>,
    all: bool,
}

impl Changed {
    fn add(&mut self, channel: ChannelId) {
        if self.all {
            return;
        }
        self.channels.insert(channel.0);
        if self.channels.len() > MAX_CHANGED_CHANNELS {
            self.channels.clear();
            self.all = true;
        }
    }

    /// Puts back a change taken from the lane (its batch did not go out).
    fn readd(&mut self, c: &pm::ChannelChanged) {
        if c.all {
            self.channels.clear();
            self.all = true;
        } else {
            self.add(ChannelId(c.channel_id));
        }
    }

    /// The envelopes owed, emptying the lane.
    fn take(&mut self) -> Vec<pm::Envelope> {
        let c = std::mem::take(self);
        let changed = |channel_id, all| pm::Envelope {
            ring_epoch: 0,
            hops: 0,
            body: Some(envelope::Body::ChannelChanged(pm::ChannelChanged {
                channel_id,
                all,
            })),
        };
        if c.all {
            vec![changed(0, true)]
        } else {
            c.channels
                .into_iter()
                .map(|id| changed(id, false))
                .collect()
        }
    }
}
/// The mesh connection's idle timeout: a peer silent this long is declared dead.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a link remembers whom its written batches were for. A batch written into a
/// connection that stays alive this long after has been acknowledged (QUIC retransmits until
/// it is, and a path that delivers nothing ends the connection after [`IDLE_TIMEOUT`]), so
/// only batches written within this window of a link's end can have been lost with it.
const RESYNC_WINDOW: Duration = Duration::from_secs(IDLE_TIMEOUT.as_secs() + 2);

/// What a peer missed because its queue was full: told to it ahead of the next batch.
#[derive(Debug, Default)]
struct Missed {
    users: BTreeSet<u64>,
    all: bool,
}

impl Missed {
    fn is_empty(&self) -> bool {
        !self.all && self.users.is_empty()
    }

    fn add(&mut self, env: &pm::Envelope) {
        match &env.body {
            Some(envelope::Body::Deliver(d)) => self.add_users(d.recipients.iter().copied()),
            Some(envelope::Body::Resync(r)) if !r.all => self.add_users(r.users.iter().copied()),
            // Channel changes have a lane of their own, and a link that comes up drops the
            // member cache: nothing to resync.
            Some(envelope::Body::ChannelChanged(_)) => {}
            // A move or a resync of everyone: which users it concerns is not listed here.
            _ => self.add_all(),
        }
    }

    fn add_users(&mut self, users: impl IntoIterator<Item = u64>) {
        if self.all {
            return;
        }
        self.users.extend(users);
        if self.users.len() > MAX_MISSED_USERS {
            self.add_all();
        }
    }

    fn add_all(&mut self) {
        self.users.clear();
        self.all = true;
    }

    /// Adds everything `other` names.
    fn absorb(&mut self, other: Missed) {
        if other.all {
            self.add_all();
        } else {
            self.add_users(other.users);
        }
    }

    fn take(&mut self) -> pm::Envelope {
        let m = std::mem::take(self);
        pm::Envelope {
            ring_epoch: 0,
            hops: 0,
            body: Some(envelope::Body::Resync(pm::Resync {
                users: m.users.into_iter().collect(),
                all: m.all,
            })),
        }
    }
}

/// Whom one link's recently written batches were for, in case the link dies before the peer
/// has them (see the module docs). Bounded: past [`MAX_MISSED_USERS`] users the oldest
/// batches are forgotten and "everyone" is remembered instead, for as long as they would have
/// been.
#[derive(Debug, Default)]
struct Written {
    /// When each batch was written, and its recipients.
    batches: VecDeque<(Instant, Vec<u64>)>,
    users: usize,
    /// The newest write whose recipients are not listed (forgotten past the bound, or an
    /// envelope that names none): until it leaves the window, a resync covers everyone.
    all_at: Option<Instant>,
}

impl Written {
    fn record(&mut self, now: Instant, envelopes: &[pm::Envelope]) {
        self.forget_before(now);
        let mut users = Vec::new();
        for env in envelopes {
            match &env.body {
                Some(envelope::Body::Deliver(d)) => users.extend_from_slice(&d.recipients),
                Some(envelope::Body::Resync(r)) if !r.all => users.extend_from_slice(&r.users),
                // Covered without a resync: a link that comes up drops the member cache.
                Some(envelope::Body::ChannelChanged(_)) => {}
                _ => self.all_at = Some(now),
            }
        }
        self.users += users.len();
        self.batches.push_back((now, users));
        while self.users > MAX_MISSED_USERS {
            let Some((at, users)) = self.batches.pop_front() else {
                break;
            };
            self.users -= users.len();
            self.all_at = self.all_at.max(Some(at));
        }
    }

    fn forget_before(&mut self, now: Instant) {
        let old = |at: &Instant| now.duration_since(*at) > RESYNC_WINDOW;
        while self.batches.front().is_some_and(|(at, _)| old(at)) {
            if let Some((_, users)) = self.batches.pop_front() {
                self.users -= users.len();
            }
        }
        if self.all_at.as_ref().is_some_and(old) {
            self.all_at = None;
        }
    }

    /// Adds the users of the batches still within the window at `now` to `missed`; returns
    /// whether there were any.
    fn resync_into(mut self, now: Instant, missed: &mut Missed) -> bool {
        self.forget_before(now);
        if self.all_at.is_some() {
            missed.add_all();
        }
        for (_, users) in &self.batches {
            missed.add_users(users.iter().copied());
        }
        self.all_at.is_some() || !self.batches.is_empty()
    }
}

/// Counters of one peer link.
#[derive(Debug, Default)]
pub struct PeerStats {
    /// Envelopes written to the link.
    pub envelopes_sent: AtomicU64,
    /// Batch frames written.
    pub frames_sent: AtomicU64,
    /// Envelopes received from the peer.
    pub envelopes_received: AtomicU64,
    /// Envelopes dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Times the link came up.
    pub connects: AtomicU64,
}

struct Peer {
    id: NodeId,
    addr: SocketAddr,
    /// Flipped when the peer leaves the member set: ends its dial loop and link.
    gone: watch::Sender<bool>,
    queue: Mutex<VecDeque<pm::Envelope>>,
    ready: Notify,
    capacity: usize,
    up: AtomicBool,
    stats: PeerStats,
    /// Bumped by every link that comes up; a link whose generation is no longer current
    /// (the peer said hello again) stops.
    link: watch::Sender<u64>,
    /// Users whose envelopes the full queue dropped, for the resync ahead of the next batch.
    missed: Mutex<Missed>,
    /// Channel member changes owed to the peer (never dropped).
    changed: Mutex<Changed>,
}

impl Peer {
    fn enqueue(&self, env: pm::Envelope) {
        // Bounded on the way in: one envelope too large for a batch frame would otherwise
        // fail the encoding of the whole batch it lands in.
        if prost::Message::encoded_len(&env) > MAX_ENVELOPE_BYTES {
            self.drop_envelope(&env, "envelope over the size limit: dropping it");
            return;
        }
        {
            let mut q = self.queue.lock();
            if q.len() >= self.capacity {
                drop(q);
                self.drop_envelope(&env, "peer queue full: dropping envelopes");
                return;
            }
            q.push_back(env);
        }
        self.ready.notify_one();
    }

    /// Drops an envelope, not invisibly: its recipients are told ahead of the next batch
    /// (the writer is woken: the queue may be empty).
    fn drop_envelope(&self, env: &pm::Envelope, why: &'static str) {
        self.missed.lock().add(env);
        self.ready.notify_one();
        let n = self.stats.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            warn!(peer = self.id.0, dropped = n, why);
        }
    }
}

/// The mesh: ring, peers, and routing.
pub struct Mesh {
    me: NodeId,
    cluster_id: String,
    view: RwLock<View>,
    peers: RwLock<BTreeMap<NodeId, Arc<Peer>>>,
    local: Arc<dyn LocalDelivery>,
    endpoint: quinn::Endpoint,
    stop: watch::Receiver<bool>,
    peer_queue: usize,
    span: tracing::Span,
}

/// What routing decisions are made from: one consistent member set.
struct View {
    epoch: u64,
    ring: Arc<Ring>,
    client_addrs: BTreeMap<NodeId, String>,
    weights: BTreeMap<NodeId, u32>,
}

/// What a node's mesh starts from: plain data, resolved from the node's configuration by the
/// caller, so this crate reads no configuration files.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// This node.
    pub me: NodeId,
    /// Name of the cluster: a peer that says hello with another name is refused.
    pub cluster_id: String,
    /// The address the mesh socket is bound to (for logs and errors).
    pub listen: SocketAddr,
    /// The CA certificates that sign every node's certificate (mutual TLS between nodes).
    pub roots: Vec<CertificateDer<'static>>,
    /// Envelopes queued per peer before new ones are dropped (counted, and their recipients
    /// resynced).
    pub peer_queue: usize,
    /// A static member list, this node included, adopted at start; empty with dynamic
    /// membership, whose member sets arrive through [`Mesh::apply`].
    pub members: Vec<MeshMember>,
    /// Ring epoch of the static member list.
    pub epoch: u64,
}

/// A member as the mesh needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshMember {
    /// Node id.
    pub id: NodeId,
    /// Mesh address (UDP).
    pub mesh_addr: SocketAddr,
    /// Client address (redirect target).
    pub client_addr: String,
    /// Ring weight.
    pub weight: u32,
}

/// Snapshot of one peer link's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerCounters {
    /// Envelopes written to the link.
    pub envelopes_sent: u64,
    /// Batch frames written.
    pub frames_sent: u64,
    /// Envelopes received from the peer.
    pub envelopes_received: u64,
    /// Envelopes dropped because the queue was full.
    pub dropped: u64,
    /// Times the link came up.
    pub connects: u64,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("me", &self.me)
            .field("epoch", &self.view.read().epoch)
            .field(
                "peers",
                &self.peers.read().keys().copied().collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Errors starting the mesh.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// rustls refused the configuration.
    #[error("tls config: {0}")]
    Rustls(#[from] rustls::Error),
    /// The QUIC config was refused.
    #[error("quic config: {0}")]
    Quic(String),
    /// The endpoint could not take its socket.
    #[error("udp socket {addr}: {source}")]
    Socket {
        /// Address.
        addr: SocketAddr,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The ring could not be built.
    #[error("ring: {0}")]
    Ring(#[from] crate::RingError),
}

fn quic_transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .keep_alive_interval(Some(Duration::from_secs(2)))
        .max_idle_timeout(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).ok());
    t
}

impl Mesh {
    /// Starts the mesh endpoint on `socket` and its accept loop; what is for this node goes to
    /// `local`. With a static member list (`config.members`) the ring and peers are set at
    /// once; with dynamic membership they arrive through [`Mesh::apply`].
    pub fn start(
        config: MeshConfig,
        identity: &Identity,
        socket: std::net::UdpSocket,
        local: Arc<dyn LocalDelivery>,
        stop: &watch::Receiver<bool>,
    ) -> Result<Arc<Self>, MeshError> {
        let c = config;
        let me = c.me;
        let listen = c.listen;
        let endpoint = mesh_endpoint(listen, identity, &c.roots, socket)?;
        let span = info_span!("mesh", me = me.0);
        let mesh = Arc::new(Self {
            me,
            cluster_id: c.cluster_id.clone(),
            view: RwLock::new(View {
                epoch: 0,
                ring: Arc::new(Ring::build(&BTreeMap::new(), DEFAULT_VNODES_PER_WEIGHT)?),
                client_addrs: BTreeMap::new(),
                weights: BTreeMap::new(),
            }),
            peers: RwLock::new(BTreeMap::new()),
            local,
            endpoint: endpoint.clone(),
            stop: stop.clone(),
            peer_queue: c.peer_queue,
            span: span.clone(),
        });
        info!(%listen, "mesh listening");
        tokio::spawn(accept_loop(mesh.clone(), endpoint, stop.clone()).instrument(span));
        if !c.members.is_empty() {
            let members = c.members;
            let weights: BTreeMap<NodeId, u32> = members.iter().map(|m| (m.id, m.weight)).collect();
            // The same ring input as Redis membership builds (and clients predict).
            let (weights, per_weight) = crate::ring::params(&weights);
            let ring = Arc::new(Ring::build(&weights, per_weight)?);
            mesh.apply(c.epoch, &ring, &members);
        }
        Ok(mesh)
    }

    /// Adopts a new member set and its ring (same ring on every node): adds and removes
    /// peers, and tells users connected here whose home moved to reconnect there (a redirect
    /// push). Returns how many users were told to move.
    pub fn apply(self: &Arc<Self>, epoch: u64, ring: &Arc<Ring>, members: &[MeshMember]) -> usize {
        {
            let mut v = self.view.write();
            v.epoch = epoch;
            v.ring = ring.clone();
            v.client_addrs = members
                .iter()
                .map(|m| (m.id, m.client_addr.clone()))
                .collect();
            v.weights = members.iter().map(|m| (m.id, m.weight)).collect();
        }
        let mut peers = self.peers.write();
        // What a departed peer may never have got: its queue and what it missed. Its link
        // hands over what it wrote lately when it ends (`run_link`).
        let mut orphaned = Missed::default();
        peers.retain(|id, p| {
            let keep = members.iter().any(|m| m.id == *id && m.mesh_addr == p.addr);
            if !keep {
                let _ = p.gone.send(true);
                info!(peer = id.0, "peer left the member set");
                for env in p.queue.lock().drain(..) {
                    orphaned.add(&env);
                }
                orphaned.absorb(std::mem::take(&mut *p.missed.lock()));
            }
            keep
        });
        for m in members.iter().filter(|m| m.id != self.me) {
            if peers.contains_key(&m.id) {
                continue;
            }
            let (gone, _) = watch::channel(false);
            let peer = Arc::new(Peer {
                id: m.id,
                addr: m.mesh_addr,
                gone,
                queue: Mutex::new(VecDeque::new()),
                ready: Notify::new(),
                capacity: self.peer_queue,
                up: AtomicBool::new(false),
                stats: PeerStats::default(),
                link: watch::channel(0).0,
                missed: Mutex::new(Missed::default()),
                changed: Mutex::new(Changed::default()),
            });
            if m.id > self.me {
                tokio::spawn(
                    dial_loop(
                        self.clone(),
                        self.endpoint.clone(),
                        peer.clone(),
                        self.stop.clone(),
                    )
                    .instrument(info_span!(parent: &self.span, "peer", id = m.id.0)),
                );
            }
            peers.insert(m.id, peer);
        }
        drop(peers);
        self.retarget(orphaned);
        // Re-home: users connected here whose owner is now another node.
        let mut moved = 0;
        for user in self.local.users() {
            let owner = ring.owner(user).unwrap_or(self.me);
            if owner == self.me {
                continue;
            }
            let addr = self
                .view
                .read()
                .client_addrs
                .get(&owner)
                .cloned()
                .unwrap_or_default();
            self.local.redirect(user, owner, addr, epoch);
            moved += 1;
        }
        info!(epoch, members = members.len(), moved, "ring adopted");
        moved
    }

    /// This node.
    pub fn me(&self) -> NodeId {
        self.me
    }

    /// The ring routing uses now.
    pub fn ring(&self) -> Arc<Ring> {
        self.view.read().ring.clone()
    }

    /// The ring epoch.
    pub fn current_epoch(&self) -> u64 {
        self.view.read().epoch
    }

    /// Counters of the link to `peer`.
    pub fn peer_stats(&self, peer: NodeId) -> Option<PeerCounters> {
        self.peers.read().get(&peer).map(|p| PeerCounters {
            envelopes_sent: p.stats.envelopes_sent.load(Ordering::Relaxed),
            frames_sent: p.stats.frames_sent.load(Ordering::Relaxed),
            envelopes_received: p.stats.envelopes_received.load(Ordering::Relaxed),
            dropped: p.stats.dropped.load(Ordering::Relaxed),
            connects: p.stats.connects.load(Ordering::Relaxed),
        })
    }

    /// Whether the link to `peer` is up.
    pub fn peer_up(&self, peer: NodeId) -> bool {
        self.peers
            .read()
            .get(&peer)
            .is_some_and(|p| p.up.load(Ordering::Relaxed))
    }

    fn peer(&self, id: NodeId) -> Option<Arc<Peer>> {
        self.peers.read().get(&id).cloned()
    }

    fn owner(&self, user: UserId) -> NodeId {
        self.view.read().ring.owner(user).unwrap_or(self.me)
    }

    /// Pushes that went to a peer which then left the member set (died): queued for it,
    /// dropped for it, or written into its link shortly before it ended. Its users now live
    /// elsewhere, where they may already be connected and done with their gap fill (they
    /// re-home on their own as soon as the ring moves, which can be before this node learns
    /// of it): their new owners tell them to fill their gaps again, here directly, on a peer
    /// through its resync lane.
    fn retarget(&self, orphaned: Missed) {
        if orphaned.is_empty() {
            return;
        }
        if orphaned.all {
            warn!("pushes for a departed peer were lost: resyncing every user");
            self.local.resync(&self.local.users());
            for p in self.peers.read().values() {
                p.missed.lock().add_all();
                p.ready.notify_one();
            }
            return;
        }
        let mut here = Vec::new();
        let mut elsewhere: BTreeMap<NodeId, Vec<u64>> = BTreeMap::new();
        for u in orphaned.users {
            match self.owner(UserId(u)) {
                owner if owner == self.me => here.push(UserId(u)),
                owner => elsewhere.entry(owner).or_default().push(u),
            }
        }
        info!(
            here = here.len(),
            elsewhere = elsewhere.values().map(Vec::len).sum::<usize>(),
            "pushes for a departed peer may be lost: resyncing their recipients"
        );
        if !here.is_empty() {
            self.local.resync(&here);
        }
        for (node, users) in elsewhere {
            match self.peer(node) {
                Some(peer) => {
                    peer.missed.lock().add_users(users);
                    peer.ready.notify_one();
                }
                None => warn!(
                    node = node.0,
                    users = users.len(),
                    "no peer entry for the new owner: these users fill at their next reconnect"
                ),
            }
        }
    }

    /// Handles one envelope from a peer.
    fn receive(&self, env: pm::Envelope) {
        let d = match env.body {
            Some(envelope::Body::Deliver(d)) => d,
            Some(envelope::Body::ChannelChanged(c)) => {
                if c.all {
                    self.local.invalidate_all_channels();
                } else {
                    self.local.invalidate_channel(ChannelId(c.channel_id));
                }
                return;
            }
            Some(envelope::Body::Resync(r)) => {
                let users: Vec<UserId> = if r.all {
                    self.local.invalidate_all_channels();
                    self.local.users()
                } else {
                    r.users.into_iter().map(UserId).collect()
                };
                warn!(
                    users = users.len(),
                    all = r.all,
                    "a peer dropped envelopes for us: telling the users to fill their gaps"
                );
                self.local.resync(&users);
                return;
            }
            // UsersMoved comes with dynamic membership.
            _ => return,
        };
        let mut here = Vec::with_capacity(d.recipients.len());
        let mut elsewhere: BTreeMap<NodeId, Vec<u64>> = BTreeMap::new();
        for r in d.recipients {
            let user = UserId(r);
            let owner = self.owner(user);
            if owner == self.me || self.local.is_online(user) || env.hops >= MAX_HOPS {
                here.push(user);
            } else {
                elsewhere.entry(owner).or_default().push(r);
            }
        }
        if !here.is_empty() {
            self.local.push_to(&here, &d.push, None);
        }
        for (node, recipients) in elsewhere {
            if let Some(peer) = self.peer(node) {
                let epoch = self.current_epoch();
                for env in deliver_envelopes(epoch, env.hops + 1, recipients, &d.push) {
                    peer.enqueue(env);
                }
            }
        }
    }
}

impl Router for Mesh {
    fn deliver(&self, recipients: &[UserId], push: &Bytes, skip: Option<ConnId>) -> Delivery {
        // One ring for the whole fan-out, and the epoch it belongs to: one lock instead of one
        // per recipient, and a ring change mid-way cannot split the recipients over two rings.
        let (ring, epoch) = {
            let v = self.view.read();
            (v.ring.clone(), v.epoch)
        };
        let me = self.me;
        // A user still connected here (before re-homing) is served here too.
        let plan = fanout::plan(
            me,
            recipients,
            |u| ring.owner(u).unwrap_or(me),
            |u| self.local.is_online(u),
        );
        let mut d = self.local.push_to(&plan.local, push, skip);
        for (node, users) in plan.remote {
            if let Some(peer) = self.peer(node) {
                for env in deliver_envelopes(epoch, 0, users, push) {
                    peer.enqueue(env);
                    d.queued += 1;
                }
            }
        }
        d
    }

    fn epoch(&self) -> u64 {
        self.current_epoch()
    }

    fn members(&self) -> Vec<MemberView> {
        let v = self.view.read();
        v.client_addrs
            .iter()
            .map(|(&node, addr)| MemberView {
                node,
                addr: addr.clone(),
                weight: v.weights.get(&node).copied().unwrap_or(1),
                state: if node == self.me {
                    "self"
                } else if self.peer_up(node) {
                    "up"
                } else {
                    "down"
                },
            })
            .collect()
    }

    fn channel_changed(&self, channel: ChannelId) {
        let peers: Vec<Arc<Peer>> = self.peers.read().values().cloned().collect();
        for peer in peers {
            peer.changed.lock().add(channel);
            peer.ready.notify_one();
        }
    }

    fn home(&self, user: UserId) -> Home {
        let v = self.view.read();
        let owner = v.ring.owner(user).unwrap_or(self.me);
        if owner == self.me {
            Home::Local
        } else {
            Home::Remote {
                node: owner,
                addr: v.client_addrs.get(&owner).cloned().unwrap_or_default(),
                epoch: v.epoch,
            }
        }
    }
}

fn mesh_endpoint(
    listen: SocketAddr,
    identity: &Identity,
    roots: &[CertificateDer<'static>],
    socket: std::net::UdpSocket,
) -> Result<quinn::Endpoint, MeshError> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone())?;
    }
    let store = Arc::new(store);
    let provider = tls::provider();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        store.clone(),
        provider.clone(),
    )
    .build()
    .map_err(|e| MeshError::Quic(format!("client verifier: {e}")))?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    server.alpn_protocols = vec![MESH_ALPN.to_vec()];
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(store)
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())?;
    client.alpn_protocols = vec![MESH_ALPN.to_vec()];
    let transport = Arc::new(quic_transport());
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(server)
            .map_err(|e| MeshError::Quic(e.to_string()))?,
    ));
    sc.transport_config(transport.clone());
    let mut cc = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(client)
            .map_err(|e| MeshError::Quic(e.to_string()))?,
    ));
    cc.transport_config(transport);
    let mut endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(sc),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|e| MeshError::Socket {
        addr: listen,
        source: e,
    })?;
    endpoint.set_default_client_config(cc);
    Ok(endpoint)
}

/// Writes one handshake frame (a `PeerHello` or its answer).
async fn write_frame<M: prost::Message>(
    send: &mut quinn::SendStream,
    msg: &M,
) -> Result<(), String> {
    let mut buf = BytesMut::new();
    encode_into(msg, 4096, &mut buf).map_err(|e| e.to_string())?;
    send.write_all(&buf).await.map_err(|e| e.to_string())
}

/// The TLS name a node's certificate carries for the mesh.
pub fn mesh_name(id: NodeId) -> String {
    format!("node-{}", id.0)
}

async fn accept_loop(mesh: Arc<Mesh>, endpoint: quinn::Endpoint, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            inc = endpoint.accept() => {
                let Some(inc) = inc else { break };
                let mesh = mesh.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let remote = inc.remote_address();
                    let conn = match inc.await {
                        Ok(c) => c,
                        Err(e) => {
                            // Includes peers without a valid cluster certificate.
                            warn!(%remote, error = %e, "mesh handshake refused");
                            return;
                        }
                    };
                    if let Err(e) = accept_peer(mesh, conn, stop).await {
                        debug!(%remote, error = %e, "mesh link ended");
                    }
                });
            }
        }
    }
    endpoint.close(0u32.into(), b"node stopping");
}

async fn accept_peer(
    mesh: Arc<Mesh>,
    conn: quinn::Connection,
    stop: watch::Receiver<bool>,
) -> Result<(), String> {
    let (mut send, recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
    let mut reader = FramedRead::new(
        recv,
        FrameCodec::<pm::PeerHello, pm::PeerHelloOk>::new(4096),
    );
    let hello = match reader.next().await {
        Some(Ok(h)) => h,
        other => return Err(format!("no hello: {other:?}")),
    };
    let peer = mesh.peer(NodeId(hello.node_id));
    let refuse = if hello.cluster_id != mesh.cluster_id {
        Some("wrong cluster")
    } else if hello.protocol_version != PROTOCOL_VERSION {
        Some("protocol version mismatch")
    } else if peer.is_none() || hello.node_id >= mesh.me.0 {
        Some("not a member that dials this node")
    } else {
        None
    };
    if let Some(why) = refuse {
        warn!(peer = hello.node_id, why, "mesh peer refused");
        conn.close(1u32.into(), why.as_bytes());
        return Err(why.into());
    }
    let Some(peer) = peer else {
        return Err("unknown peer".into());
    };
    write_frame(
        &mut send,
        &pm::PeerHelloOk {
            node_id: mesh.me.0,
            protocol_version: PROTOCOL_VERSION,
            ring_epoch: mesh.current_epoch(),
        },
    )
    .await?;
    if hello.ring_epoch != mesh.current_epoch() {
        warn!(
            peer = hello.node_id,
            theirs = hello.ring_epoch,
            ours = mesh.current_epoch(),
            "ring epochs differ"
        );
    }
    let recv = reader.into_inner();
    run_link(mesh, peer, conn, send, recv, stop).await;
    Ok(())
}

async fn dial_loop(
    mesh: Arc<Mesh>,
    endpoint: quinn::Endpoint,
    peer: Arc<Peer>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut gone = peer.gone.subscribe();
    loop {
        let attempt = async {
            let conn = endpoint
                .connect(peer.addr, &mesh_name(peer.id))
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())?;
            let (mut send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            write_frame(
                &mut send,
                &pm::PeerHello {
                    cluster_id: mesh.cluster_id.clone(),
                    node_id: mesh.me.0,
                    protocol_version: PROTOCOL_VERSION,
                    ring_epoch: mesh.current_epoch(),
                },
            )
            .await?;
            let mut reader = FramedRead::new(
                recv,
                FrameCodec::<pm::PeerHelloOk, pm::PeerHello>::new(4096),
            );
            match reader.next().await {
                Some(Ok(ok)) if ok.node_id == peer.id.0 => {}
                other => return Err(format!("bad hello reply: {other:?}")),
            }
            Ok::<_, String>((conn, send, reader.into_inner()))
        };
        let result = tokio::select! {
            _ = stop.changed() => return,
            _ = gone.changed() => return,
            r = attempt => r,
        };
        match result {
            Ok((conn, send, recv)) => {
                backoff = Duration::from_millis(100);
                run_link(mesh.clone(), peer.clone(), conn, send, recv, stop.clone()).await;
                if *stop.borrow() || *gone.borrow() {
                    return;
                }
            }
            Err(e) => debug!(error = %e, "dial failed"),
        }
        // Jittered exponential backoff.
        let jitter =
            Duration::from_millis(rand::random::<u64>() % (backoff.as_millis() as u64 / 2 + 1));
        tokio::select! {
            _ = stop.changed() => return,
            _ = gone.changed() => return,
            _ = tokio::time::sleep(backoff + jitter) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Runs an established link until either side fails or the node stops.
async fn run_link(
    mesh: Arc<Mesh>,
    peer: Arc<Peer>,
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    mut stop: watch::Receiver<bool>,
) {
    // This link replaces any older one of the same peer.
    let mut generation = 0;
    peer.link.send_modify(|g| {
        *g += 1;
        generation = *g;
    });
    let mut replaced = peer.link.subscribe();
    let replaced = async move {
        while replaced.changed().await.is_ok() {
            if *replaced.borrow() != generation {
                return;
            }
        }
        std::future::pending::<()>().await
    };
    peer.up.store(true, Ordering::Relaxed);
    peer.stats.connects.fetch_add(1, Ordering::Relaxed);
    // A `ChannelChanged` the peer wrote into the link this one replaces may never have
    // arrived: cached member lists are re-read from storage rather than trusted.
    mesh.local.invalidate_all_channels();
    info!(peer = peer.id.0, generation, "mesh link up");
    let reader = {
        let mesh = mesh.clone();
        let peer = peer.clone();
        async move {
            let mut frames = FramedRead::new(
                recv,
                FrameCodec::<pm::PeerBatch, pm::PeerBatch>::new(MAX_MESH_FRAME),
            );
            while let Some(frame) = frames.next().await {
                match frame {
                    Ok(batch) => {
                        peer.stats
                            .envelopes_received
                            .fetch_add(batch.envelopes.len() as u64, Ordering::Relaxed);
                        for env in batch.envelopes {
                            mesh.receive(env);
                        }
                    }
                    Err(e) => {
                        warn!(peer = peer.id.0, error = %e, "bad mesh frame");
                        break;
                    }
                }
            }
        }
    };
    // The batch being written, put back at the front of the queue if the write does not
    // complete (this link's own: a replacing link has its own).
    let writing: Mutex<Vec<pm::Envelope>> = Mutex::new(Vec::new());
    // Whom the batches it wrote were for, resynced if the link ends before the peer has them.
    let written: Mutex<Written> = Mutex::new(Written::default());
    let writer = async {
        let mut buf = BytesMut::new();
        loop {
            let batch: Vec<pm::Envelope> = {
                let mut out = Vec::new();
                {
                    let mut missed = peer.missed.lock();
                    if !missed.is_empty() {
                        out.push(missed.take());
                    }
                }
                // Member changes go before the pushes queued after them.
                out.extend(peer.changed.lock().take());
                let mut q = peer.queue.lock();
                let mut bytes = 0usize;
                while out.len() < BATCH_ENVELOPES && bytes < BATCH_BYTES {
                    match q.pop_front() {
                        Some(e) => {
                            bytes += prost::Message::encoded_len(&e);
                            out.push(e);
                        }
                        None => break,
                    }
                }
                out
            };
            if batch.is_empty() {
                peer.ready.notified().await;
                continue;
            }
            let n = batch.len() as u64;
            buf.clear();
            let frame = pm::PeerBatch { envelopes: batch };
            if let Err(e) = encode_into(&frame, MAX_MESH_FRAME, &mut buf) {
                warn!(error = %e, "batch did not encode; dropped, its recipients resynced");
                peer.stats.dropped.fetch_add(n, Ordering::Relaxed);
                for env in &frame.envelopes {
                    match &env.body {
                        // Back on the lane that is never dropped, not a resync of everyone.
                        Some(envelope::Body::ChannelChanged(c)) => {
                            peer.changed.lock().readd(c);
                        }
                        _ => peer.missed.lock().add(env),
                    }
                }
                continue;
            }
            // Kept until the write completes: requeued if it fails or is cancelled.
            *writing.lock() = frame.envelopes;
            if send.write_all(&buf).await.is_err() {
                break;
            }
            let done = std::mem::take(&mut *writing.lock());
            written.lock().record(Instant::now(), &done);
            peer.stats.envelopes_sent.fetch_add(n, Ordering::Relaxed);
            peer.stats.frames_sent.fetch_add(1, Ordering::Relaxed);
        }
    };
    let mut gone = peer.gone.subscribe();
    let superseded = tokio::select! {
        _ = reader => false,
        _ = writer => false,
        _ = stop.changed() => false,
        _ = gone.changed() => false,
        _ = conn.closed() => false,
        _ = replaced => true,
    };
    // What this link wrote lately may have died with it: the next link resyncs those users;
    // if the peer left the member set (it died), their new owners do. Nothing to do if this
    // node stops.
    if !*stop.borrow() && *gone.borrow() {
        let mut lost = Missed::default();
        let written = std::mem::take(&mut *written.lock());
        written.resync_into(Instant::now(), &mut lost);
        for env in std::mem::take(&mut *writing.lock()) {
            lost.add(&env);
        }
        mesh.retarget(lost);
    } else if !*stop.borrow() {
        let written = std::mem::take(&mut *written.lock());
        if written.resync_into(Instant::now(), &mut peer.missed.lock()) {
            debug!(
                peer = peer.id.0,
                "link ended: resyncing the recipients of its recent batches"
            );
            peer.ready.notify_one();
        }
    }
    // A batch whose write did not complete goes back to the front of the queue.
    let unsent = std::mem::take(&mut *writing.lock());
    if !unsent.is_empty() {
        let mut q = peer.queue.lock();
        for env in unsent.into_iter().rev() {
            q.push_front(env);
        }
        drop(q);
        peer.ready.notify_one();
    }
    if !superseded {
        peer.up.store(false, Ordering::Relaxed);
    }
    conn.close(0u32.into(), b"link closed");
    info!(peer = peer.id.0, generation, superseded, "mesh link down");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changed_of(env: &pm::Envelope) -> (u64, bool) {
        match &env.body {
            Some(envelope::Body::ChannelChanged(c)) => (c.channel_id, c.all),
            other => panic!("not a channel change: {other:?}"),
        }
    }

    fn deliver(recipients: Vec<u64>) -> pm::Envelope {
        pm::Envelope {
            ring_epoch: 1,
            hops: 0,
            body: Some(envelope::Body::Deliver(pm::Deliver {
                recipients,
                push: Bytes::new(),
            })),
        }
    }

    #[test]
    fn a_dead_link_does_not_resync_everyone_for_a_channel_change() {
        let t0 = Instant::now();
        let mut w = Written::default();
        let changed = pm::Envelope {
            ring_epoch: 0,
            hops: 0,
            body: Some(envelope::Body::ChannelChanged(pm::ChannelChanged {
                channel_id: 9,
                all: false,
            })),
        };
        w.record(t0, &[changed, deliver(vec![5])]);
        let mut missed = Missed::default();
        assert!(w.resync_into(t0, &mut missed));
        assert!(!missed.all, "a channel change must not resync everyone");
        assert_eq!(missed.users, BTreeSet::from([5]));
    }

    #[test]
    fn channel_changes_coalesce_per_channel_then_into_all() {
        let mut c = Changed::default();
        for id in [7, 3, 7, 7] {
            c.add(ChannelId(id));
        }
        let out: Vec<_> = c.take().iter().map(changed_of).collect();
        assert_eq!(out, vec![(3, false), (7, false)]);
        assert!(c.take().is_empty(), "taking empties the lane");
        for id in 1..=MAX_CHANGED_CHANNELS as u64 + 1 {
            c.add(ChannelId(id));
        }
        let out: Vec<_> = c.take().iter().map(changed_of).collect();
        assert_eq!(out, vec![(0, true)]);
    }

    #[test]
    fn a_dead_link_resyncs_the_recipients_of_its_recent_batches_only() {
        let t0 = Instant::now();
        let mut w = Written::default();
        w.record(t0, &[deliver(vec![1, 2])]);
        w.record(t0 + Duration::from_secs(5), &[deliver(vec![3])]);
        // Ends within the window of the second batch only.
        let mut missed = Missed::default();
        let end = t0 + RESYNC_WINDOW + Duration::from_secs(1);
        assert!(w.resync_into(end, &mut missed));
        assert_eq!(missed.users, BTreeSet::from([3]));
        assert!(!missed.all);
    }

    #[test]
    fn past_the_bound_the_oldest_batches_become_everyone() {
        let t0 = Instant::now();
        let mut w = Written::default();
        let big: Vec<u64> = (0..MAX_MISSED_USERS as u64).collect();
        w.record(t0, &[deliver(big)]);
        w.record(t0, &[deliver(vec![u64::MAX])]);
        assert!(w.users <= MAX_MISSED_USERS);
        let mut missed = Missed::default();
        assert!(w.resync_into(t0, &mut missed));
        assert!(missed.all, "the forgotten list is resynced as everyone");

        // Once the forgotten batch is out of the window, "everyone" is forgotten too.
        let mut w = Written::default();
        w.record(t0, &[deliver((0..MAX_MISSED_USERS as u64).collect())]);
        w.record(t0 + Duration::from_secs(5), &[deliver(vec![u64::MAX])]);
        let mut missed = Missed::default();
        let end = t0 + RESYNC_WINDOW + Duration::from_secs(1);
        assert!(w.resync_into(end, &mut missed));
        assert!(!missed.all);
        assert_eq!(missed.users, BTreeSet::from([u64::MAX]));
        assert!(!Written::default().resync_into(end, &mut Missed::default()));
    }
}
