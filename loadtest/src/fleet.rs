//! The connection fleet: N synthetic users, one real QUIC connection each, spread over many
//! client endpoints (UDP sockets) and source addresses in 127.0.0.0/8, opened at a paced
//! ramp with a bound on handshakes in flight.
//!
//! Each connection goes straight to its user's home node when the cluster's member list is
//! known (the harness builds the same ring the nodes build), and follows the node's redirect
//! otherwise. A task per connection drains its events into the [`Tracker`], follows redirect
//! pushes, fills gaps, and heals a connection that dropped without being asked to.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use meshchat_backplane::ring::{DEFAULT_VNODES_PER_WEIGHT, Ring};
use meshchat_client::{Client, ConnectOptions, Event, Events};
use meshchat_idgen::{NodeId, UserId};
use parking_lot::{Mutex, RwLock};
use tokio::sync::Semaphore;
use tracing::{Instrument, debug, info_span};

use crate::tracker::{Counters, Tracker};

/// Distinct error texts kept for the report.
const MAX_ERROR_KINDS: usize = 32;

/// How the fleet connects.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Node addresses (any node; users are sent home).
    pub servers: Vec<String>,
    /// Client transport settings.
    pub options: ConnectOptions,
    /// Connections (= synthetic users) to open.
    pub connections: usize,
    /// Client UDP sockets to spread them over.
    pub endpoints: usize,
    /// Loopback source addresses to spread the endpoints over (127.0.0.1 ..= 127.0.0.N).
    pub source_addrs: u8,
    /// Source addresses to use instead of loopback ones (the nodes run in network
    /// namespaces); empty: 127.0.0.1 ..= 127.0.0.`source_addrs`.
    pub source_ips: Vec<IpAddr>,
    /// New connections started per second.
    pub ramp_rate: f64,
    /// Handshakes in flight at once.
    pub concurrency: usize,
    /// Kernel UDP buffer asked for each client socket.
    pub udp_buffer: usize,
}

/// One synthetic user and its connection.
#[derive(Debug)]
pub struct Slot {
    /// The user.
    pub user: UserId,
    token: String,
    client: OnceLock<Arc<Client>>,
    /// A planned close or reconnect is under way: its disconnect is not a failure.
    planned: AtomicBool,
}

#[derive(Debug)]
struct Homes {
    ring: Ring,
    addrs: HashMap<NodeId, String>,
}

/// The fleet.
#[derive(Debug)]
pub struct Fleet {
    cfg: FleetConfig,
    slots: Vec<Slot>,
    endpoints: Vec<quinn::Endpoint>,
    homes: RwLock<Option<Homes>>,
    tracker: Arc<Tracker>,
    stopping: AtomicBool,
    errors: Mutex<BTreeMap<String, u64>>,
}

/// Why the fleet could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// A client socket could not be made.
    #[error("client socket on {addr}: {source}")]
    Socket {
        /// Source address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The client library refused the setup.
    #[error(transparent)]
    Client(#[from] meshchat_client::ClientError),
}

fn udp_socket(addr: SocketAddr, buffer: usize) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    let _ = s.set_recv_buffer_size(buffer);
    let _ = s.set_send_buffer_size(buffer);
    s.bind(&addr.into())?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

impl Fleet {
    /// Makes the endpoints; `tokens[i]` authenticates `users[i]`.
    pub fn new(
        cfg: FleetConfig,
        users: Vec<(UserId, String)>,
        tracker: Arc<Tracker>,
    ) -> Result<Arc<Self>, FleetError> {
        let v6 = cfg
            .servers
            .first()
            .and_then(|s| meshchat_client::conn::resolve(s).ok())
            .is_some_and(|(a, _)| a.is_ipv6());
        let mut endpoints = Vec::new();
        for e in 0..cfg.endpoints.max(1) {
            let ip: IpAddr = if let Some(&ip) = cfg.source_ips.get(e % cfg.source_ips.len().max(1))
            {
                ip
            } else if v6 {
                IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1])
            } else {
                // 127.0.0.1 ..= 127.0.0.N: all of 127/8 is local on Linux.
                let host = 1 + (e % usize::from(cfg.source_addrs.max(1))) as u8;
                IpAddr::V4(Ipv4Addr::new(127, 0, 0, host))
            };
            let addr = SocketAddr::new(ip, 0);
            let socket = udp_socket(addr, cfg.udp_buffer)
                .map_err(|source| FleetError::Socket { addr, source })?;
            endpoints.push(meshchat_client::conn::client_endpoint_on(
                &cfg.options,
                socket,
            )?);
        }
        let slots = users
            .into_iter()
            .map(|(user, token)| Slot {
                user,
                token,
                client: OnceLock::new(),
                planned: AtomicBool::new(false),
            })
            .collect();
        Ok(Arc::new(Self {
            cfg,
            slots,
            endpoints,
            homes: RwLock::new(None),
            tracker,
            stopping: AtomicBool::new(false),
            errors: Mutex::new(BTreeMap::new()),
        }))
    }

    /// Counts an error by its text (the report lists the kinds).
    pub fn note_error(&self, what: &str, e: &dyn std::fmt::Display) {
        let mut text = format!("{what}: {e}");
        text.truncate(160);
        let mut errors = self.errors.lock();
        if errors.len() < MAX_ERROR_KINDS || errors.contains_key(&text) {
            *errors.entry(text).or_default() += 1;
        } else {
            *errors.entry("(other errors)".into()).or_default() += 1;
        }
    }

    /// Errors seen, by text.
    pub fn errors(&self) -> BTreeMap<String, u64> {
        self.errors.lock().clone()
    }

    /// Slots in the fleet.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the fleet has no slots.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The user of slot `i`.
    pub fn user(&self, i: usize) -> UserId {
        self.slots[i].user
    }

    /// The client of slot `i`, once it connected.
    pub fn client(&self, i: usize) -> Option<Arc<Client>> {
        self.slots.get(i)?.client.get().cloned()
    }

    /// Slots whose connection was established (at some point).
    pub fn established(&self) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&i| self.slots[i].client.get().is_some())
            .collect()
    }

    /// Connections open right now.
    pub fn open_now(&self) -> usize {
        self.slots
            .iter()
            .filter_map(|s| s.client.get())
            .filter(|c| c.conn().is_ok_and(|c| c.is_open()))
            .count()
    }

    /// Open connections per node address.
    pub fn per_server(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for c in self.slots.iter().filter_map(|s| s.client.get()) {
            if c.conn().is_ok_and(|c| c.is_open()) {
                *m.entry(c.server()).or_default() += 1;
            }
        }
        m
    }

    /// Slots connected to `server` right now.
    pub fn open_on(&self, server: &str) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&i| {
                self.slots[i]
                    .client
                    .get()
                    .is_some_and(|c| c.server() == server && c.conn().is_ok_and(|c| c.is_open()))
            })
            .collect()
    }

    fn server_for(&self, i: usize) -> String {
        if let Some(h) = self.homes.read().as_ref()
            && let Some(node) = h.ring.owner(self.slots[i].user)
            && let Some(addr) = h.addrs.get(&node)
        {
            return addr.clone();
        }
        self.cfg.servers[i % self.cfg.servers.len()].clone()
    }

    /// Opens every connection: paced at `ramp_rate`, at most `concurrency` handshakes at once.
    /// `on_progress` is called after each connection settles (opened or failed).
    pub async fn open_all(self: &Arc<Self>, on_progress: impl Fn() + Send + Sync + 'static) {
        if self.slots.is_empty() || self.cfg.servers.is_empty() {
            return;
        }
        // The first connection learns the member list, so the rest can go straight home.
        if self.open_slot(0).await
            && let Some(c) = self.client(0)
        {
            match c.cluster().await {
                Ok(info) if info.members.len() > 1 => {
                    let weights: BTreeMap<NodeId, u32> = info
                        .members
                        .iter()
                        .map(|m| (NodeId(m.node_id), m.weight.max(1)))
                        .collect();
                    if let Ok(ring) = Ring::build(&weights, DEFAULT_VNODES_PER_WEIGHT) {
                        let addrs = info
                            .members
                            .iter()
                            .map(|m| (NodeId(m.node_id), m.address.clone()))
                            .collect();
                        *self.homes.write() = Some(Homes { ring, addrs });
                    }
                }
                Ok(_) => {}
                Err(e) => self.note_error("cluster query", &e),
            }
        }
        on_progress();
        let on_progress = Arc::new(on_progress);
        let gate = Arc::new(Semaphore::new(self.cfg.concurrency.max(1)));
        let start = tokio::time::Instant::now();
        let rate = self.cfg.ramp_rate.max(1.0);
        let mut tasks = tokio::task::JoinSet::new();
        for i in 1..self.slots.len() {
            tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
            let Ok(permit) = gate.clone().acquire_owned().await else {
                break;
            };
            let fleet = self.clone();
            let on_progress = on_progress.clone();
            tasks.spawn(async move {
                fleet.open_slot(i).await;
                drop(permit);
                on_progress();
            });
            // Reap finished handles so the set stays small.
            while tasks.try_join_next().is_some() {}
        }
        while tasks.join_next().await.is_some() {}
    }

    /// Connects and authenticates slot `i`; false if it failed.
    async fn open_slot(self: &Arc<Self>, i: usize) -> bool {
        let slot = &self.slots[i];
        let endpoint = self.endpoints[i % self.endpoints.len()].clone();
        let server = self.server_for(i);
        let span = info_span!("loadtest_conn", user = slot.user.0, %server);
        let started = Instant::now();
        let opened = async {
            let (client, events) =
                Client::connect_with(endpoint, &server, self.cfg.options.clone()).await?;
            client.authenticate(&slot.token).await?;
            Ok::<_, meshchat_client::ClientError>((client, events))
        }
        .instrument(span)
        .await;
        match opened {
            Ok((client, events)) => {
                self.tracker.handshake(started.elapsed());
                let client = Arc::new(client);
                let _ = slot.client.set(client.clone());
                Counters::inc(&self.tracker.counters.established);
                let fleet = self.clone();
                tokio::spawn(async move { fleet.drain(i, client, events).await });
                true
            }
            Err(e) => {
                Counters::inc(&self.tracker.counters.connect_failed);
                self.note_error("connect", &e);
                false
            }
        }
    }

    /// Feeds slot `i`'s events to the tracker until the client is gone.
    async fn drain(self: Arc<Self>, i: usize, client: Arc<Client>, mut events: Events) {
        let user = self.slots[i].user;
        let counters = &self.tracker.counters;
        while let Some(ev) = events.next().await {
            match ev {
                Event::Message(m) => self.tracker.delivered(user, m.message_id, &m.body),
                // The load test sends no typing indicators and does not measure presence.
                Event::Typing(_) | Event::Presence(_) => {}
                Event::Redirect(r) => {
                    Counters::inc(&counters.redirects);
                    let (fleet, client) = (self.clone(), client.clone());
                    tokio::spawn(async move {
                        fleet.slots[i].planned.store(true, Ordering::Relaxed);
                        if let Err(e) = client.follow_redirect(&r).await {
                            fleet.note_error("redirect", &e);
                        }
                        fleet.slots[i].planned.store(false, Ordering::Relaxed);
                    });
                }
                Event::Gap { .. } | Event::Resync => {
                    Counters::inc(&counters.gaps);
                    let resync = matches!(ev, Event::Resync);
                    let (fleet, client) = (self.clone(), client.clone());
                    tokio::spawn(async move {
                        let fill = if resync {
                            client.resync().await
                        } else {
                            client.fill_gaps().await
                        };
                        if let Err(e) = fill {
                            fleet.note_error("gap fill", &e);
                        }
                    });
                }
                Event::NodeError { code, message } => {
                    Counters::inc(&counters.node_errors);
                    self.note_error("node error", &format!("code {code}: {message}"));
                }
                Event::Disconnected { code, reason } => {
                    if self.stopping.load(Ordering::Relaxed)
                        || self.slots[i].planned.load(Ordering::Relaxed)
                        || client.conn().is_ok_and(|c| c.is_open())
                    {
                        continue;
                    }
                    Counters::inc(&counters.unplanned_disconnects);
                    self.note_error("disconnected", &format!("code {code}: {reason}"));
                    let (fleet, client) = (self.clone(), client.clone());
                    tokio::spawn(async move { fleet.heal(i, &client).await });
                }
                Event::Silent => {
                    // Try the new home ahead of the liveness timeout; if that does not work
                    // out and the connection is gone meanwhile, heal it as a failure.
                    Counters::inc(&counters.silences);
                    let (fleet, client) = (self.clone(), client.clone());
                    tokio::spawn(async move {
                        let (sessions, tries) =
                            (client.authentications(), client.early_rehome_attempts());
                        if let Err(e) = client.rehome_early().await {
                            debug!(user = user.0, error = %e, "early re-home not done");
                        }
                        if client.early_rehome_attempts() > tries
                            && client.authentications() > sessions
                        {
                            Counters::inc(&fleet.tracker.counters.early_rehomes);
                        }
                        if !fleet.stopping.load(Ordering::Relaxed)
                            && !client.conn().is_ok_and(|c| c.is_open())
                        {
                            fleet.heal(i, &client).await;
                        }
                    });
                }
                Event::Receipt(_) | Event::Reaction(_) | Event::Channel(_) => {}
            }
        }
        debug!(user = user.0, "event stream ended");
    }

    /// Restores a connection that dropped on its own, as a real client does: a failover
    /// (any known node, redirected home; never straight back to a node that just failed)
    /// until it works or the run stops, with jittered exponential backoff (100 ms .. 5 s)
    /// between failovers, one at a time per connection.
    async fn heal(&self, i: usize, client: &Client) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let jitter =
                Duration::from_millis(rand::random::<u64>() % (backoff.as_millis() as u64 + 1));
            tokio::time::sleep(backoff / 2 + jitter).await;
            if self.stopping.load(Ordering::Relaxed) || client.conn().is_ok_and(|c| c.is_open()) {
                return;
            }
            let Some(r) = self.reconnect_once(i, client, true).await else {
                return; // another reconnect of this connection is under way
            };
            match r {
                Ok(()) => return,
                Err(e) => self.note_error("heal", &e),
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// One reconnect (or, for a connection that failed, a failover) of slot `i`, marked
    /// planned while it runs (its disconnect is no failure); `None` if one is already under
    /// way.
    async fn reconnect_once(
        &self,
        i: usize,
        client: &Client,
        failover: bool,
    ) -> Option<Result<(), meshchat_client::ClientError>> {
        if self.slots[i].planned.swap(true, Ordering::Relaxed) {
            return None;
        }
        let r = if failover {
            client.failover().await
        } else {
            client.reconnect().await
        };
        self.slots[i].planned.store(false, Ordering::Relaxed);
        Some(r)
    }

    /// A planned reconnect of slot `i` (the reconnect scenario): close, connect,
    /// authenticate, fill the gap. Records its time.
    pub async fn reconnect(&self, i: usize) {
        let Some(client) = self.client(i) else {
            return;
        };
        let started = Instant::now();
        let Some(r) = self.reconnect_once(i, &client, false).await else {
            return; // one already under way
        };
        match r {
            Ok(()) => {
                self.tracker.reconnect(started.elapsed());
                Counters::inc(&self.tracker.counters.reconnects_ok);
            }
            Err(e) => {
                Counters::inc(&self.tracker.counters.reconnects_failed);
                self.note_error("reconnect", &e);
                self.heal(i, &client).await;
            }
        }
    }

    /// Closes every connection and waits (briefly) for the endpoints to go idle.
    pub async fn close_all(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        for c in self.slots.iter().filter_map(|s| s.client.get()) {
            c.close();
        }
        for e in &self.endpoints {
            let _ = tokio::time::timeout(Duration::from_secs(2), e.wait_idle()).await;
        }
    }
}
