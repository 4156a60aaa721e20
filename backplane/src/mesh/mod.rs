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
//! - **Draining a static cluster**: a node's `NodeState` (sent first on every link and again
//!   when it changes, never dropped) says whether it drains. With a static member list each
//!   node's ring is the configured members minus those draining ([`Mesh::drain_static`]); a
//!   drained node that comes back says it no longer drains and is put back. With Redis
//!   membership Redis says who drains, and `NodeState` is ignored.
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
//! recipients of the batches it wrote within the last [`link::RESYNC_WINDOW`] (bounded like the
//! missed set: past [`peer::MAX_MISSED_USERS`] it becomes "everyone"), and when the link ends
//! (failed, closed, timed out, or replaced by a new hello) they join the missed set: the next
//! link's first batch carries a `Resync` for them, and their clients fill the gap while
//! online. A peer that says hello again (a restart, or a new connection while the old one is
//! not yet known dead) replaces its old link at once: the old link stops taking envelopes
//! from the queue, so none is written into a dead connection. A receiver that no longer owns a recipient (its ring moved on)
//! delivers to that recipient's connections it still has and forwards the rest to the owner it
//! knows, once (`hops` bounds it).
//!
//! ## Where each part lives
//!
//! - here: [`Mesh`], what it starts from ([`MeshConfig`]), starting it, its counters;
//! - `view.rs`: the member view and routing ([`Mesh::apply`], the
//!   [`Router`](crate::delivery::Router) the send path uses, envelopes received from peers,
//!   resyncing a departed peer's pushes);
//! - `peer.rs`: one peer's bounded queue, its lanes that are never dropped, envelope bounds;
//! - `link.rs`: the endpoint, the hello, reconnects, and one link's reader and batch writer.

mod link;
mod peer;
mod view;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use meshchat_idgen::NodeId;
use parking_lot::{Mutex, RwLock};
use rustls_pki_types::CertificateDer;
use tokio::sync::watch;
use tracing::{Instrument, info, info_span};

pub use link::mesh_name;
pub use peer::{PeerCounters, PeerStats};
pub use view::StaticDrainError;

use crate::delivery::LocalDelivery;
use crate::ring::{DEFAULT_VNODES_PER_WEIGHT, Ring};
use crate::tls::{Identity, TlsError};
use link::{accept_loop, mesh_crypto, mesh_endpoint};
use peer::Peer;
use view::View;

/// The mesh: ring, peers, and routing.
pub struct Mesh {
    me: NodeId,
    cluster_id: String,
    view: RwLock<View>,
    peers: RwLock<BTreeMap<NodeId, Arc<Peer>>>,
    local: Arc<dyn LocalDelivery>,
    endpoint: quinn::Endpoint,
    /// The TLS this node dials peers with (replaced by [`Mesh::set_tls`]).
    client_tls: RwLock<quinn::ClientConfig>,
    stop: watch::Receiver<bool>,
    peer_queue: usize,
    peer_queue_bytes: usize,
    span: tracing::Span,
    /// The configured member list and who of it drains (`None` with dynamic membership).
    statics: Option<StaticMembers>,
    /// This node is draining (told to every peer in its `NodeState`).
    draining: AtomicBool,
}

/// A static cluster's member list, and the members that said they drain: the ring is the
/// list without them.
struct StaticMembers {
    members: Vec<MeshMember>,
    epoch: u64,
    /// Members (this node too) draining, as they said in their `NodeState`.
    draining: Mutex<BTreeSet<NodeId>>,
    /// Held while a ring is computed and adopted, so two changes adopt in order.
    applying: Mutex<()>,
}

/// The mesh's TLS, built by [`Mesh::prepare_tls`].
#[derive(Debug)]
pub struct MeshTls {
    server: quinn::ServerConfig,
    client: quinn::ClientConfig,
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
    /// Bytes of envelopes queued per peer before new ones are dropped (the same way).
    pub peer_queue_bytes: usize,
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
    /// TLS or socket setup.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The ring could not be built.
    #[error("ring: {0}")]
    Ring(#[from] crate::RingError),
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
        let (server_tls, client_tls) = mesh_crypto(identity, &c.roots)?;
        let endpoint = mesh_endpoint(listen, server_tls, socket)?;
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
            client_tls: RwLock::new(client_tls),
            stop: stop.clone(),
            peer_queue: c.peer_queue,
            peer_queue_bytes: c.peer_queue_bytes,
            span: span.clone(),
            statics: (!c.members.is_empty()).then(|| StaticMembers {
                members: c.members,
                epoch: c.epoch,
                draining: Mutex::new(BTreeSet::new()),
                applying: Mutex::new(()),
            }),
            draining: AtomicBool::new(false),
        });
        info!(%listen, "mesh listening");
        tokio::spawn(accept_loop(mesh.clone(), endpoint, stop.clone()).instrument(span));
        if mesh.statics.is_some() {
            mesh.apply_static()?;
        }
        Ok(mesh)
    }

    /// Builds the mesh's TLS for a certificate rotation, to apply with [`Mesh::set_tls`]
    /// (built apart so that a caller can build everything it reloads before applying any).
    pub fn prepare_tls(
        identity: &Identity,
        roots: &[CertificateDer<'static>],
    ) -> Result<MeshTls, MeshError> {
        let (server, client) = mesh_crypto(identity, roots)?;
        Ok(MeshTls { server, client })
    }

    /// Replaces the mesh's certificate, key and CA roots: links made from now on, dialled or
    /// accepted, use them; links up now keep the session they have.
    pub fn set_tls(&self, tls: MeshTls) {
        self.endpoint.set_server_config(Some(tls.server));
        *self.client_tls.write() = tls.client;
        info!("mesh certificates reloaded");
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
        self.peers.read().get(&peer).map(|p| {
            let (queued, queued_bytes) = {
                let q = p.queue.lock();
                (q.len(), q.bytes())
            };
            PeerCounters {
                envelopes_sent: p.stats.envelopes_sent.load(Ordering::Relaxed),
                frames_sent: p.stats.frames_sent.load(Ordering::Relaxed),
                envelopes_received: p.stats.envelopes_received.load(Ordering::Relaxed),
                dropped: p.stats.dropped.load(Ordering::Relaxed),
                connects: p.stats.connects.load(Ordering::Relaxed),
                incarnation: p.incarnation,
                queued,
                queued_bytes,
                rtt: p.conn.lock().as_ref().map(quinn::Connection::rtt),
            }
        })
    }

    /// The peers this node keeps a link to (or dials), in id order.
    pub fn peer_ids(&self) -> Vec<NodeId> {
        self.peers.read().keys().copied().collect()
    }

    /// Whether the link to `peer` is up.
    pub fn peer_up(&self, peer: NodeId) -> bool {
        self.peers
            .read()
            .get(&peer)
            .is_some_and(|p| p.up.load(Ordering::Relaxed))
    }

    /// Members whose link is down, or up but silent (no datagram, not even a keep-alive
    /// ACK) for longer than `within`. Empty when this node hears every other member: the
    /// membership driver then keeps a fenced node's clients, because a cluster whose members
    /// all still hear each other lost its source of truth as a whole, and there is no
    /// serving node to send them to.
    pub fn silent_peers(&self, within: std::time::Duration) -> Vec<NodeId> {
        self.peers
            .read()
            .values()
            .filter(|p| {
                !p.up.load(Ordering::Relaxed)
                    || p.heard.lock().is_none_or(|at| at.elapsed() > within)
            })
            .map(|p| p.id)
            .collect()
    }

    fn peer(&self, id: NodeId) -> Option<Arc<Peer>> {
        self.peers.read().get(&id).cloned()
    }
}
