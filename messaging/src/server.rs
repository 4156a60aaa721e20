//! Running a node: bind the QUIC endpoint, accept connections within the bounds, and shut
//! down gracefully.
//!
//! Shutdown order: stop accepting; tell every connection task (a `watch` flips); each task
//! stops reading, finishes its in-flight requests (their storage writes complete, so nothing
//! acked is lost), writes their replies and closes its connection with `UNAVAILABLE`; wait
//! for the tasks up to `shutdown_grace`; close the store (its writer drains the queue);
//! wait for the endpoint to send its CONNECTION_CLOSE frames.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshchat_backplane::delivery::LocalDelivery;
use meshchat_backplane::lease::LeaseGate;
use meshchat_backplane::membership_redis::{Fencing, RedisMembership, Registration};
use meshchat_backplane::mesh::{Mesh, MeshConfig, MeshMember};
use meshchat_idgen::NodeId;
use meshchat_proto::client::ErrorCode;
use meshchat_storage::{EmbeddedStore, Storage};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::admission::{Admit, HandshakeGate};
use crate::auth::{Auth, AuthSetupError};
use crate::config::{Backend, EndpointKind, NodeConfig};
use crate::error::{RequestError, close_code};
use crate::members::MemberCache;
use crate::node::Node;
use crate::registry::Registry;
use crate::router::{LocalRouter, NodeDelivery, Router};
use crate::session;
use crate::tls::{self, TlsError};

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// TLS or socket setup failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Token secret setup failed.
    #[error(transparent)]
    Auth(#[from] AuthSetupError),
    /// Storage did not open.
    #[error("storage: {0}")]
    Storage(#[from] meshchat_storage::StorageError),
    /// Configuration refused.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

impl From<RequestError> for StartError {
    fn from(e: RequestError) -> Self {
        StartError::Other(e.to_string())
    }
}

/// A started node: its address and a way to stop it.
#[derive(Debug)]
pub struct RunningNode {
    /// The bound UDP address.
    pub addr: SocketAddr,
    /// The chat service (for inspection in tests and metrics).
    pub node: Arc<Node>,
    /// The mesh, when the node is part of a cluster.
    pub mesh: Option<Arc<Mesh>>,
    /// The admin HTTP listener's bound address, when `[admin] listen` is set.
    pub admin_addr: Option<SocketAddr>,
    /// The client-facing endpoint (its TLS config is replaced on a reload).
    pub(crate) endpoint: ClientEndpoint,
    /// The handshake gate (its limits are replaced on a reload).
    pub(crate) gate: Arc<HandshakeGate>,
    /// The Retry token key, kept across reloads.
    pub(crate) token_key: Arc<ring::hkdf::Prk>,
    /// The TLS session tickets for 0-RTT (kept across reloads).
    pub(crate) tickets: Arc<crate::tickets::TicketStore>,
    /// The configuration as given to `start`, with what reloads applied (what a reload
    /// compares with).
    pub(crate) given: parking_lot::Mutex<Box<NodeConfig>>,
    stop: watch::Sender<bool>,
    done: tokio::task::JoinHandle<()>,
}

impl RunningNode {
    /// TLS session tickets held for 0-RTT, and the bytes they are counted at.
    pub fn tickets(&self) -> (usize, usize) {
        self.tickets.usage()
    }

    /// Turns true when a drain of this node is done (`POST /drain`): stop it then.
    pub fn drained(&self) -> watch::Receiver<bool> {
        self.node.drain().done()
    }

    /// Stops the node gracefully and waits until it is down.
    pub async fn shutdown(self) {
        let RunningNode {
            node,
            mesh,
            endpoint,
            stop,
            done,
            ..
        } = self;
        // Our handles must not keep the store open past the accept loop's close of it, nor
        // the socket bound past its release of the port.
        drop(node);
        drop(mesh);
        drop(endpoint);
        let _ = stop.send(true);
        if let Err(e) = done.await {
            warn!(error = %e, "node task ended abnormally");
        }
    }
}

/// What serves the client port (`transport.endpoint`), as the node commands it.
#[derive(Debug)]
pub(crate) enum ClientEndpoint {
    /// quinn's async endpoint.
    Quinn(quinn::Endpoint),
    /// meshchat's endpoint loops (`transport.loops` of them).
    Loop(Vec<meshchat_edge::EdgeControl>),
}

impl ClientEndpoint {
    /// New connections are made with `config` from now on.
    pub(crate) fn set_server_config(&self, config: quinn::ServerConfig) {
        match self {
            ClientEndpoint::Quinn(e) => e.set_server_config(Some(config)),
            ClientEndpoint::Loop(loops) => {
                let config = Arc::new(config);
                for c in loops {
                    if !c.set_server_config(Some(config.clone())) {
                        warn!("an endpoint loop did not take the new TLS config (stopped or busy)");
                    }
                }
            }
        }
    }
}

/// What the admin listener reads of the endpoint loops (empty on quinn's endpoint): each
/// loop's counters, the datagrams the group's receiver dropped for a full loop queue, and how
/// the reads of the client socket go (the lone loop's, or the group's receiver's).
#[derive(Debug, Default)]
pub(crate) struct LoopWatch {
    pub(crate) loops: parking_lot::Mutex<Vec<watch::Receiver<meshchat_edge::EdgeStats>>>,
    pub(crate) queue_dropped: Arc<std::sync::atomic::AtomicU64>,
    pub(crate) recv: Arc<meshchat_edge::udp::RecvHealth>,
}

/// The client port as bound: quinn's endpoint, or the loop's socket and TLS config.
enum ClientPort {
    Quinn(quinn::Endpoint),
    Loop(tokio::net::UdpSocket, Arc<quinn::ServerConfig>),
}

/// The client port ready to serve: quinn's endpoint, or the loop and its socket.
enum Serving {
    Quinn(quinn::Endpoint),
    Loop(
        Vec<meshchat_edge::Edge<session::looped::NodeApp>>,
        tokio::net::UdpSocket,
    ),
}

/// Opens storage, binds the endpoint and starts accepting. Returns once the node listens.
pub async fn start(config: NodeConfig) -> Result<RunningNode, StartError> {
    config.validate()?;
    let given = parking_lot::Mutex::new(Box::new(config.clone()));
    let admin_listener = match config.admin.listen {
        Some(listen) => Some(crate::admin::bind(listen).await?),
        None => None,
    };
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| StartError::Other(format!("data dir {}: {e}", config.data_dir.display())))?;
    let secret = Auth::load_or_create_secret(&config.secret_file())?;
    let previous = Auth::load_previous(&config.auth.previous_secret_files)?;
    let auth = Auth::new(
        &secret,
        config.auth.token_ttl,
        config.auth.max_concurrent_hashes,
    )
    .with_previous_secrets(&previous)
    .with_max_lifetime(config.auth.max_login_lifetime);
    // Every process on this store (one host) takes its worker id's lock for its lifetime: a
    // second process with the same worker id (a duplicate node id, or a stale process still
    // running) is refused here instead of issuing duplicate ids.
    let worker_lock = match config.storage.backend {
        Backend::Embedded => Some(lock_worker_id(&config).await?),
        Backend::Cassandra => None,
    };
    let (storage, embedded): (Arc<dyn Storage>, Option<Arc<EmbeddedStore>>) =
        match config.storage.backend {
            Backend::Embedded => {
                let store = Arc::new(EmbeddedStore::open_dir(&config.data_dir)?);
                (store.clone(), Some(store))
            }
            Backend::Cassandra => {
                let cfg = config.storage.cassandra.to_config()?;
                let store = meshchat_storage::cassandra::CassandraStore::connect(&cfg).await?;
                (Arc::new(store), None)
            }
        };
    let identity = tls::node_identity(&config)?;
    let client_cert_expiry = tls::not_after_unix(&identity.chain[0]);
    let token_key = tls::token_key();
    let tickets = Arc::new(crate::tickets::TicketStore::new(
        config.transport.ticket_store_bytes,
    ));
    let server_config = tls::server_config(
        identity,
        meshchat_proto::CLIENT_ALPN,
        &config,
        &token_key,
        &tickets,
    )?;
    let socket = tls::udp_socket(config.listen, &config.transport)?;
    let addr = socket
        .local_addr()
        .map_err(|e| StartError::Other(format!("endpoint address: {e}")))?;
    let client_port = match config.transport.endpoint {
        EndpointKind::Quinn => ClientPort::Quinn(
            quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                Some(server_config),
                socket,
                Arc::new(quinn::TokioRuntime),
            )
            .map_err(|e| StartError::Other(format!("endpoint: {e}")))?,
        ),
        EndpointKind::Loop => {
            socket
                .set_nonblocking(true)
                .map_err(|e| StartError::Other(format!("endpoint socket: {e}")))?;
            let socket = tokio::net::UdpSocket::from_std(socket)
                .map_err(|e| StartError::Other(format!("endpoint socket: {e}")))?;
            ClientPort::Loop(socket, Arc::new(server_config))
        }
    };
    let mut config = config;
    if config.advertise.is_none() {
        // Port 0 in `listen` means "any": tell clients the port actually bound. (An
        // unspecified listen address without `advertise` was refused by `validate`.)
        config.advertise = Some(addr.to_string());
    }
    let registry = Arc::new(Registry::new());
    let members = Arc::new(MemberCache::new());
    let (stop, stop_rx) = watch::channel(false);
    let clustered = !config.cluster.members.is_empty() || config.cluster.redis.is_some();
    let mut mesh_cert_expiry = None;
    let (router, mesh): (Arc<dyn Router>, Option<Arc<Mesh>>) = if !clustered {
        (
            Arc::new(LocalRouter::new(
                registry.clone(),
                crate::metrics::NodeMetrics::new(config.node_id),
            )),
            None,
        )
    } else {
        let local = Arc::new(NodeDelivery::new(
            registry.clone(),
            members.clone(),
            crate::metrics::NodeMetrics::new(config.node_id),
        ));
        let mesh_tls = tls::mesh_identity(&config)?;
        mesh_cert_expiry = tls::not_after_unix(&mesh_tls.0.chain[0]);
        let mesh = start_mesh_as(&config, mesh_tls, local, &stop_rx)?;
        (mesh.clone(), Some(mesh))
    };
    let mut node = Node::new(config, storage, auth, registry.clone(), router, members)?;
    let driver = node.config.cluster.redis.clone().map(|url| {
        let c = &node.config;
        RedisMembership {
            url,
            prefix: format!("meshchat:{}", c.cluster.cluster_id),
            me: registration(c),
            worker: c.worker_id(),
            heartbeat: c.cluster.heartbeat,
            ttl: c.cluster.member_ttl,
            draining: Arc::default(),
        }
    });
    if let Some(driver) = &driver {
        // No ids and no clients until the first round takes the worker-id lease.
        node.set_lease_gate(Arc::new(LeaseGate::closed()));
        node.set_drain(crate::drain::DrainVia::Redis(driver.clone()));
    } else if let Some(mesh) = mesh.as_ref().filter(|m| m.is_static()) {
        node.set_drain(crate::drain::DrainVia::Mesh(mesh.clone()));
    }
    let node = Arc::new(node);
    node.set_cert_expiry(client_cert_expiry, mesh_cert_expiry);
    if let (Some(driver), Some(mesh)) = (driver, mesh.clone()) {
        let fencing = Fencing {
            gate: node.lease_gate().clone(),
            ids: node.id_generator(),
            clients: registry,
        };
        tokio::spawn(driver.run(mesh, fencing, stop_rx.clone()));
    }
    let span = info_span!("node", id = node.config.node_id, %addr);
    let limits = &node.config.limits;
    let gate = Arc::new(HandshakeGate::new(
        limits.max_concurrent_handshakes,
        limits.retry_above_handshakes,
        limits.max_handshakes_per_source,
    ));
    let loop_watch = Arc::new(LoopWatch::default());
    let (admin_addr, admin_task) = match admin_listener {
        Some(listener) => {
            let state = crate::admin::AdminState {
                loops: loop_watch.clone(),
                node: Arc::downgrade(&node),
                mesh: mesh.as_ref().map(Arc::downgrade),
                store: embedded.as_ref().map(Arc::downgrade),
                gate: gate.clone(),
                tickets: tickets.clone(),
                stop: stop_rx.clone(),
            };
            let (admin_stop, until) = watch::channel(false);
            let (a, task) = {
                let _in_span = span.enter();
                crate::admin::start(listener, state, until)?
            };
            (Some(a), Some((admin_stop, task)))
        }
        None => (None, None),
    };
    // One loop per worker thread of this runtime unless `transport.loops` says otherwise.
    let loops = node
        .config
        .transport
        .loop_count(tokio::runtime::Handle::current().metrics().num_workers());
    let (endpoint, serving) = match client_port {
        ClientPort::Quinn(e) => (ClientEndpoint::Quinn(e.clone()), Serving::Quinn(e)),
        ClientPort::Loop(socket, server_config) => {
            let l = &node.config.limits;
            let slow = close_code(ErrorCode::SlowReader).into_inner() as u32;
            let unavailable = close_code(ErrorCode::Unavailable).into_inner() as u32;
            let held = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let edges: Vec<_> = (0..loops)
                .map(|k| {
                    let edge = meshchat_edge::Edge::new(
                        server_config.clone(),
                        session::looped::NodeApp::new(node.clone(), gate.clone()),
                    )
                    // What one connection may have unsent: beyond the session's own soft
                    // mark (where it stops reading and draining pushes), room for replies in
                    // progress and for one step of pushes.
                    .with_pending_limit(
                        (l.max_frame_bytes as usize)
                            .saturating_mul(
                                l.max_inflight_per_conn + 2 + session::looped::PUSH_STEP,
                            )
                            .max(1024 * 1024),
                        slow,
                        b"client stopped reading",
                    )
                    .with_shutdown(
                        node.config
                            .shutdown_grace
                            .saturating_add(Duration::from_secs(1)),
                        unavailable,
                        b"node shutting down",
                    );
                    if loops > 1 {
                        edge.in_group(k as u8, held.clone())
                    } else {
                        edge.with_recv_health(loop_watch.recv.clone())
                    }
                })
                .collect();
            *loop_watch.loops.lock() = edges.iter().map(|e| e.stats()).collect();
            let controls = edges.iter().map(|e| e.control(Some(addr))).collect();
            (ClientEndpoint::Loop(controls), Serving::Loop(edges, socket))
        }
    };
    let node_for_loop = node.clone();
    let gate_for_loop = gate.clone();
    let done = tokio::spawn(
        async move {
            match serving {
                Serving::Quinn(endpoint) => {
                    accept_loop(
                        node_for_loop,
                        endpoint,
                        embedded,
                        gate_for_loop,
                        admin_task,
                        stop_rx,
                    )
                    .await;
                }
                Serving::Loop(edges, socket) => {
                    serve_loop(
                        node_for_loop,
                        edges,
                        socket,
                        loop_watch,
                        embedded,
                        admin_task,
                        stop_rx,
                    )
                    .await;
                }
            }
            // Held until the node is down: only then may another process take the worker id.
            drop(worker_lock);
        }
        .instrument(span),
    );
    info!(
        %addr,
        node = node.config.node_id,
        endpoint = ?node.config.transport.endpoint,
        loops = ?(node.config.transport.endpoint == EndpointKind::Loop)
            .then_some(loops),
        lean_tls = node.config.transport.lean_tls,
        "listening"
    );
    Ok(RunningNode {
        addr,
        node,
        mesh,
        admin_addr,
        endpoint,
        gate,
        token_key,
        tickets,
        given,
        stop,
        done,
    })
}

/// What this node publishes in Redis: the addresses its peers and clients dial, never the
/// ones it binds (`cluster.mesh_advertise`, else `cluster.mesh_listen`; `advertise`, which
/// `start` has set to the bound address if it was not given).
fn registration(c: &NodeConfig) -> Registration {
    Registration {
        id: c.node_id,
        mesh: c
            .cluster
            .mesh_advertised()
            .map(|a| a.to_string())
            .unwrap_or_default(),
        client: c.advertised(),
        weight: c.cluster.weight,
        draining: false,
    }
}

/// Starts the node's side of the mesh from its `[cluster]` config: the mesh identity and CA
/// (default: the development mesh CA in the data dir), a UDP socket on `cluster.mesh_listen`
/// and the static member list, if any. What the mesh delivers to this node goes to `local`.
pub fn start_mesh(
    config: &NodeConfig,
    local: Arc<dyn LocalDelivery>,
    stop: &watch::Receiver<bool>,
) -> Result<Arc<Mesh>, StartError> {
    start_mesh_as(config, tls::mesh_identity(config)?, local, stop)
}

/// [`start_mesh`] with the mesh identity and CA roots already loaded.
fn start_mesh_as(
    config: &NodeConfig,
    (identity, roots): (
        tls::Identity,
        Vec<rustls_pki_types::CertificateDer<'static>>,
    ),
    local: Arc<dyn LocalDelivery>,
    stop: &watch::Receiver<bool>,
) -> Result<Arc<Mesh>, StartError> {
    let c = &config.cluster;
    let listen = c
        .mesh_listen
        .ok_or_else(|| StartError::Other("mesh: cluster.mesh_listen is not set".into()))?;
    // The mesh keeps the default transport buffers, whatever `[transport]` says for clients.
    let socket = tls::udp_socket(listen, &crate::config::TransportSettings::default())?;
    let mesh_config = MeshConfig {
        me: NodeId(config.node_id),
        cluster_id: c.cluster_id.clone(),
        listen,
        roots,
        peer_queue: c.peer_queue,
        peer_queue_bytes: c.peer_queue_bytes,
        members: c
            .members
            .iter()
            .map(|m| MeshMember {
                id: NodeId(m.id),
                mesh_addr: m.mesh_addr,
                client_addr: m.client_addr.clone(),
                weight: m.weight,
            })
            .collect(),
        epoch: c.epoch,
    };
    Mesh::start(mesh_config, &identity, socket, local, stop)
        .map_err(|e| StartError::Other(e.to_string()))
}

/// Takes `<data_dir>/worker-<w>.lock` (an exclusive advisory lock, released by the kernel when
/// the process dies), or refuses to start because another process holds it.
async fn lock_worker_id(config: &NodeConfig) -> Result<std::fs::File, StartError> {
    let path = config
        .data_dir
        .join(format!("worker-{}.lock", config.worker_id()));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StartError::Other(format!("{}: {e}", path.display())))?;
    // A holder that is exiting (killed a moment ago, and restarted at once by a supervisor or
    // an operator) releases the lock only once the kernel has torn the process down: give it
    // a moment before calling the worker id taken.
    let deadline = std::time::Instant::now() + WORKER_LOCK_WAIT;
    let mut logged = false;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                if !logged {
                    info!(path = %path.display(), "worker id lock held: waiting for its holder to exit");
                    logged = true;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StartError::Other(format!(
                    "worker id {} is in use by another process on this store ({}): two \
                     processes with one worker id would issue duplicate message and user ids; \
                     give each node its own node_id (or worker_id)",
                    config.worker_id(),
                    path.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(StartError::Other(format!("{}: {e}", path.display())));
            }
        }
    }
}

/// How long a starting node waits for another process's lock on its worker id to go away
/// before refusing to start.
const WORKER_LOCK_WAIT: Duration = Duration::from_secs(3);

/// Runs a node until `shutdown` resolves, then stops it gracefully.
pub async fn run(config: NodeConfig, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let running = start(config).await?;
    let mut drained = running.drained();
    tokio::select! {
        () = shutdown => info!("shutting down"),
        _ = drained.wait_for(|d| *d) => info!("drained: shutting down"),
    }
    running.shutdown().await;
    Ok(())
}

async fn accept_loop(
    node: Arc<Node>,
    endpoint: quinn::Endpoint,
    store: Option<Arc<EmbeddedStore>>,
    gate: Arc<HandshakeGate>,
    admin: Option<(watch::Sender<bool>, tokio::task::JoinHandle<()>)>,
    mut stop: watch::Receiver<bool>,
) {
    let tasks = TaskTracker::new();
    tokio::spawn(node.clone().presence_loop(stop.clone()));
    let mut housekeeping = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = housekeeping.tick() => node.housekeeping(),
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let limits = node.limits();
                // Connections in any state (handshaking or live) count against the bound.
                if tasks.len() >= limits.max_connections {
                    node.metrics.handshake("refused", None);
                    incoming.refuse();
                    continue;
                }
                let source = incoming.remote_address().ip();
                match gate.admit(source, incoming.remote_address_validated()) {
                    Admit::Now(slot) => {
                        tasks.spawn(session::serve(node.clone(), incoming, slot, stop.clone()));
                    }
                    Admit::Wait(share) => {
                        let (node, gate, stop) = (node.clone(), gate.clone(), stop.clone());
                        let wait = limits.handshake_queue_wait;
                        tasks.spawn(async move {
                            match tokio::time::timeout(wait, gate.wait(share)).await {
                                Ok(slot) => session::serve(node, incoming, slot, stop).await,
                                Err(_) => {
                                    debug!(%source, "no handshake slot in time; refused");
                                    node.metrics.handshake("refused", None);
                                    incoming.refuse();
                                }
                            }
                        });
                    }
                    // Costs the node no state; a spoofed source never answers.
                    Admit::Retry => {
                        if incoming.retry().is_err() {
                            debug!(%source, "retry of a validated address; refused");
                        }
                    }
                    Admit::Refuse => {
                        debug!(%source, "too many handshakes from one source; refused");
                        node.metrics.handshake("refused", None);
                        incoming.refuse();
                    }
                }
            }
        }
    }
    // Stop accepting new connections at the QUIC layer too.
    endpoint.set_server_config(None);

    tasks.close();
    let grace = node.config.shutdown_grace;
    if tokio::time::timeout(grace.saturating_add(Duration::from_secs(1)), tasks.wait())
        .await
        .is_err()
    {
        warn!(
            left = tasks.len(),
            "connections still open after the grace period; closing them"
        );
        for c in node.registry.all() {
            c.conn.close(ErrorCode::Unavailable, b"node shutting down");
        }
    }
    stop_admin_and_store(node, store, admin).await;
    endpoint.close(close_code(ErrorCode::Unavailable), b"node shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    let bound = endpoint.local_addr().ok();
    drop(endpoint);
    if let Some(addr) = bound {
        port_released(addr).await;
    }
    info!("stopped");
}

/// Serves the client port with the endpoint loops until `stop` (one reads the socket itself;
/// several share it through a receiver that hands each datagram to its loop); then each loop
/// gives its sessions the shutdown grace (each answers its requests in progress and closes
/// with `UNAVAILABLE`), the admin listener and the store close, and the port is released.
async fn serve_loop(
    node: Arc<Node>,
    mut edges: Vec<meshchat_edge::Edge<session::looped::NodeApp>>,
    socket: tokio::net::UdpSocket,
    loop_watch: Arc<LoopWatch>,
    store: Option<Arc<EmbeddedStore>>,
    admin: Option<(watch::Sender<bool>, tokio::task::JoinHandle<()>)>,
    stop: watch::Receiver<bool>,
) {
    tokio::spawn(node.clone().presence_loop(stop.clone()));
    let housekeeping = {
        let (node, mut stop) = (node.clone(), stop.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    _ = every.tick() => node.housekeeping(),
                }
            }
        })
    };
    let bound = socket.local_addr().ok();
    if edges.len() == 1 {
        let edge = edges.remove(0);
        if let Err(e) = edge.run(socket, stop).await {
            warn!(error = %e, "the endpoint loop failed");
        }
    } else {
        match meshchat_edge::udp::Udp::new(socket) {
            // One socket state for the group: its receiver reads, each loop sends.
            Ok(udp) => serve_group(edges, Arc::new(udp), &loop_watch, stop).await,
            // As a lone loop that fails to start: logged; the node stops when told.
            Err(e) => warn!(error = %e, "the endpoint loops' socket failed"),
        }
    }
    let _ = housekeeping.await;
    stop_admin_and_store(node, store, admin).await;
    if let Some(addr) = bound {
        port_released(addr).await;
    }
    info!("stopped");
}

/// Several loops on one socket: each its own task fed by one receiver, until every loop has
/// returned (the receiver runs until then: a stopping loop needs its closes acknowledged).
async fn serve_group(
    edges: Vec<meshchat_edge::Edge<session::looped::NodeApp>>,
    udp: Arc<meshchat_edge::udp::Udp>,
    loop_watch: &LoopWatch,
    stop: watch::Receiver<bool>,
) {
    let (mut queues, mut loops) = (Vec::new(), Vec::new());
    for edge in edges {
        let (tx, rx) = tokio::sync::mpsc::channel(meshchat_edge::spread::QUEUE_DATAGRAMS);
        queues.push(tx);
        let span = info_span!("loop", index = loops.len());
        loops.push(tokio::spawn(
            edge.run_fed(udp.clone(), rx, stop.clone()).instrument(span),
        ));
    }
    let (done, until) = watch::channel(false);
    let receiver = tokio::spawn(meshchat_edge::spread::dispatch(
        udp,
        queues,
        until,
        loop_watch.queue_dropped.clone(),
        loop_watch.recv.clone(),
    ));
    for l in loops {
        match l.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "an endpoint loop failed"),
            Err(e) => warn!(error = %e, "an endpoint loop ended abnormally"),
        }
    }
    let _ = done.send(true);
    let _ = receiver.await;
}

/// The last of a shutdown, once the connections are gone: the admin listener (it answered
/// `/readyz` with 503 while they drained), then the store.
async fn stop_admin_and_store(
    node: Arc<Node>,
    store: Option<Arc<EmbeddedStore>>,
    admin: Option<(watch::Sender<bool>, tokio::task::JoinHandle<()>)>,
) {
    if let Some((admin_stop, mut task)) = admin {
        let _ = admin_stop.send(true);
        if tokio::time::timeout(Duration::from_secs(2), &mut task)
            .await
            .is_err()
        {
            task.abort();
            let _ = task.await;
        }
    }
    drop(node);
    // Every request finished, so the store's queue is empty; close it to be sure. (Cassandra
    // writes were acknowledged by the cluster before they were acked: nothing to drain.)
    if let Some(store) = store {
        match Arc::try_unwrap(store) {
            Ok(store) => store.close().await,
            Err(_) => warn!("store still referenced at shutdown; its writer drains on drop"),
        }
    }
}

/// Waits (at most 2 s) until `addr` can be bound again. quinn's endpoint driver task owns the
/// socket and drops it a moment after the last endpoint handle; a node started in the same
/// process right after shutdown (a restart) would otherwise find its port still in use.
async fn port_released(addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        match std::net::UdpSocket::bind(addr) {
            Ok(_) => return,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {}
            Err(e) => {
                debug!(%addr, error = %e, "could not check the listen port");
                return;
            }
        }
        if tokio::time::Instant::now() >= deadline {
            warn!(%addr, "listen port still bound 2 s after shutdown");
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_redis_registration_publishes_the_advertised_addresses() {
        let mut c = NodeConfig {
            node_id: 7,
            listen: "0.0.0.0:7400".parse().expect("addr"),
            advertise: Some("chat7.example.net:7400".into()),
            ..NodeConfig::default()
        };
        c.cluster.redis = Some("redis://10.0.0.9:6379/".into());
        c.cluster.mesh_listen = Some("0.0.0.0:7500".parse().expect("addr"));
        c.cluster.mesh_advertise = Some("10.0.0.7:7500".parse().expect("addr"));
        c.cluster.weight = 3;
        c.validate().expect("valid");
        assert_eq!(
            registration(&c),
            Registration {
                id: 7,
                mesh: "10.0.0.7:7500".into(),
                client: "chat7.example.net:7400".into(),
                weight: 3,
                draining: false,
            }
        );
        // Without mesh_advertise, a specific mesh_listen is what peers dial.
        c.cluster.mesh_listen = Some("10.0.0.7:7501".parse().expect("addr"));
        c.cluster.mesh_advertise = None;
        assert_eq!(registration(&c).mesh, "10.0.0.7:7501");
    }
}
