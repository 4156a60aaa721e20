//! The node's metrics: their names, labels, help texts and where each one is recorded.
//!
//! Recording goes through the `metrics` facade; the process's recorder is the Prometheus
//! exporter's, installed by [`prometheus`] when a node with an admin listener starts, before
//! its [`NodeMetrics`] registers its handles (a node without one holds no-op handles). Every
//! node metric carries the label `node` (the node id), so several nodes in one process (the
//! dev cluster, tests) keep apart; the admin listener of a node serves only its own series
//! and the process's. A thread runs the exporter's upkeep every 5 s, so histograms stay
//! bounded whether or not anything scrapes.
//!
//! Two kinds of recording:
//! - on the paths themselves (requests, handshakes, pushes, appends): counters and latency
//!   histograms through handles registered once (per request type and outcome on first
//!   use), so a record is an atomic add, with no key built and no allocation;
//! - at scrape time ([`crate::admin`]): gauges and counters read from state the node keeps
//!   anyway (connections, queue depths, the lease, the ring, peer links, argon2 slots).
//!
//! The list with types and labels is in docs/OPERATIONS.md ("Metrics").

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dashmap::DashMap;
use meshchat_backplane::mesh::PeerCounters;
use meshchat_idgen::NodeId;
use meshchat_proto::client::{ErrorCode, client_frame};
use metrics::{
    Counter, Histogram, SharedString, Unit, counter, describe_counter, describe_gauge,
    describe_histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing::warn;

/// Histogram buckets of every `*_seconds` metric: 0.5 ms to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
];

static RECORDER: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// How often the exporter's histogram buffers are drained into their buckets.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The process's Prometheus recorder, installed on the first call. `None` if the process had
/// installed another `metrics` recorder first (the node's metrics then go to that one).
pub fn prometheus() -> Option<&'static PrometheusHandle> {
    RECORDER
        .get_or_init(|| {
            let builder = match PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            {
                Ok(b) => b,
                Err(e) => {
                    warn!(error = %e, "metrics: bad histogram buckets");
                    return None;
                }
            };
            match builder.install_recorder() {
                Ok(handle) => {
                    describe();
                    metrics_process::Collector::default().describe();
                    let upkeep = handle.clone();
                    let spawned = std::thread::Builder::new()
                        .name("mc-metrics".into())
                        .spawn(move || {
                            loop {
                                std::thread::sleep(UPKEEP_EVERY);
                                upkeep.run_upkeep();
                            }
                        });
                    if let Err(e) = spawned {
                        warn!(error = %e, "metrics: no upkeep thread; histograms drain on scrape only");
                    }
                    Some(handle)
                }
                Err(e) => {
                    warn!(error = %e, "metrics: another recorder is installed; /metrics is empty");
                    None
                }
            }
        })
        .as_ref()
}

fn describe() {
    describe_gauge!(
        "meshchat_connections",
        "Client connections by state: handshaking, established (QUIC up), authenticated."
    );
    describe_gauge!(
        "meshchat_endpoint_loop_connections",
        "QUIC connections each endpoint loop holds (transport.endpoint = loop), by loop."
    );
    describe_counter!(
        "meshchat_endpoint_datagrams_dropped_total",
        "Datagrams the endpoint loops dropped, by reason: loop_queue_full (in), socket_full and send_error (out)."
    );
    describe_counter!(
        "meshchat_endpoint_recv_errors_total",
        "Reads of the client socket that failed (reports of ICMP errors excluded); endpoint loops only."
    );
    describe_counter!(
        "meshchat_handshakes_total",
        "Client handshakes by outcome: ok, failed, timeout, refused (no slot, over a cap)."
    );
    describe_histogram!(
        "meshchat_handshake_duration_seconds",
        Unit::Seconds,
        "Time from a handshake slot being granted to the QUIC handshake's end."
    );
    describe_counter!(
        "meshchat_auth_failures_total",
        "Failed Register/Login/Authenticate requests by reason (the error code)."
    );
    describe_counter!(
        "meshchat_requests_total",
        "Client requests by type and outcome (ok, or the error code)."
    );
    describe_histogram!(
        "meshchat_request_duration_seconds",
        Unit::Seconds,
        "Time from a request read to its reply made, by type, for requests answered ok; type=send is the ack latency."
    );
    describe_counter!(
        "meshchat_rate_limited_total",
        "Requests refused with RATE_LIMITED, by request type."
    );
    describe_counter!(
        "meshchat_early_data_requests_total",
        "Requests read from 0-RTT early data: served (replay-safe) or too_early (refused TOO_EARLY)."
    );
    describe_counter!(
        "meshchat_presence_changes_total",
        "Presence changes this node published: scope=node (a user's first visible connection here came or the last went, told to every peer), scope=cluster (the state in the whole cluster of a user homed here flipped, or the ring moved the user here: pushed to their contacts)."
    );
    describe_counter!(
        "meshchat_messages_sent_total",
        "Messages stored and acked (idempotent retries not counted)."
    );
    describe_counter!(
        "meshchat_pushes_total",
        "Push frames written to client connections."
    );
    describe_counter!(
        "meshchat_push_queue_full_total",
        "Connections cut off because their outbound queue was full (slow readers)."
    );
    describe_histogram!(
        "meshchat_delivery_latency_seconds",
        Unit::Seconds,
        "Time from a message's id being issued (before its append, on the sender's node and clock) to its push queued on the recipients' connections here."
    );
    describe_histogram!(
        "meshchat_storage_duration_seconds",
        Unit::Seconds,
        "Storage latency seen by the node, by operation (append: durable before it returns)."
    );
    describe_gauge!(
        "meshchat_store_queue_depth",
        "Writes waiting for the embedded store's writer thread."
    );
    describe_gauge!(
        "meshchat_tls_tickets",
        "TLS session tickets held for 0-RTT resumption (each used once)."
    );
    describe_gauge!(
        "meshchat_tls_ticket_bytes",
        Unit::Bytes,
        "Bytes the ticket store is counted at (bounded by transport.ticket_store_bytes)."
    );
    describe_gauge!(
        "meshchat_argon2_in_progress",
        "Password hashes running or waiting for a hashing slot."
    );
    describe_counter!(
        "meshchat_argon2_rejected_total",
        "Registrations and logins refused OVERLOADED: no hashing slot in time."
    );
    describe_gauge!(
        "meshchat_peer_up",
        "1 while the mesh link to the peer is up; 0 once the peer left the member set."
    );
    describe_gauge!(
        "meshchat_certificate_expiry_seconds",
        Unit::Seconds,
        "Time left until the certificate in use expires: cert=client (client-facing) or mesh."
    );
    describe_gauge!(
        "meshchat_peer_member",
        "1 while the peer is in this node's member set; 0 once it left (drained, stopped, removed)."
    );
    describe_gauge!(
        "meshchat_peer_queue_depth",
        "Envelopes queued for the peer (waiting for its link)."
    );
    describe_gauge!(
        "meshchat_peer_queue_bytes",
        "Bytes of envelopes queued for the peer (bounded by cluster.peer_queue_bytes, plus a batch put back)."
    );
    describe_gauge!(
        "meshchat_peer_rtt_seconds",
        Unit::Seconds,
        "The mesh link's round-trip time estimate (QUIC); NaN while the link is down."
    );
    describe_counter!(
        "meshchat_peer_envelopes_sent_total",
        "Envelopes written to the peer's link."
    );
    describe_counter!(
        "meshchat_peer_envelopes_received_total",
        "Envelopes received from the peer."
    );
    describe_counter!(
        "meshchat_peer_dropped_total",
        "Envelopes to the peer dropped because its queue was full (the peer then resyncs)."
    );
    describe_counter!(
        "meshchat_peer_connects_total",
        "Times the link to the peer came up."
    );
    describe_gauge!(
        "meshchat_ring_epoch",
        "Epoch of the ring this node routes by."
    );
    describe_gauge!("meshchat_ring_members", "Nodes on this node's ring.");
    describe_gauge!(
        "meshchat_lease_held",
        "1 while this process holds its Snowflake worker-id lease (0: fenced)."
    );
    describe_gauge!(
        "meshchat_draining",
        "1 once a drain started: off the ring, users moving, the node stops when they left."
    );
    describe_gauge!(
        "meshchat_ready",
        "1 while /readyz answers 200 (as of the last scrape)."
    );
}

/// One node's recording handles: its `node` label, the handles of its metrics, and the
/// counters kept here. Cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct NodeMetrics {
    node: SharedString,
    established: Arc<AtomicU64>,
    h: Arc<Handles>,
}

/// Handles registered once; per request type (and outcome) on first use.
#[derive(Debug)]
struct Handles {
    requests: DashMap<(&'static str, &'static str), Counter>,
    request_seconds: DashMap<&'static str, Histogram>,
    rate_limited: DashMap<&'static str, Counter>,
    auth_failures: DashMap<&'static str, Counter>,
    handshakes: DashMap<&'static str, Counter>,
    handshake_seconds: Histogram,
    pushes: Counter,
    early_served: Counter,
    early_refused: Counter,
    presence_node: Counter,
    presence_cluster: Counter,
    messages_sent: Counter,
    append_seconds: Histogram,
    delivery_seconds: Histogram,
    /// Whether a recorder exports what is recorded (else the delivery latency, which costs a
    /// look into the push, is not measured).
    exporting: bool,
    /// Per-peer counter totals across the peer's incarnations, by (metric, peer).
    peer_totals: DashMap<(&'static str, String), PeerTotal>,
    /// Peers given series so far: one that left gets `meshchat_peer_up` 0, not its last value.
    peers_seen: DashMap<String, ()>,
}

/// One per-peer counter: the `Peer` incarnation it was last read from, its value then, and
/// the final values of the earlier incarnations added up.
#[derive(Debug, Clone, Copy, Default)]
struct PeerTotal {
    incarnation: u64,
    last: u64,
    earlier: u64,
}

impl PeerTotal {
    /// The exported total after reading `value` from `incarnation`.
    fn read(&mut self, incarnation: u64, value: u64) -> u64 {
        // Incarnations only grow: a scrape that read an older one after a newer one (two
        // scrapes around a rejoin) changes nothing.
        if incarnation < self.incarnation {
            return self.earlier + self.last;
        }
        if incarnation != self.incarnation {
            self.earlier += self.last;
            self.incarnation = incarnation;
        }
        self.last = value;
        self.earlier + value
    }
}

/// The label value of a request's outcome: `ok` or the protocol's error code name.
pub fn outcome<T, E>(r: &Result<T, E>, code: impl Fn(&E) -> ErrorCode) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(e) => code(e).as_str_name(),
    }
}

/// The label value of a request's type (the `ClientFrame` body's field name).
pub fn request_type(body: &client_frame::Body) -> &'static str {
    use client_frame::Body as B;
    match body {
        B::Hello(_) => "hello",
        B::Register(_) => "register",
        B::Login(_) => "login",
        B::Authenticate(_) => "authenticate",
        B::Send(_) => "send",
        B::Receipt(_) => "receipt",
        B::React(_) => "react",
        B::Unreact(_) => "unreact",
        B::History(_) => "history",
        B::ChatList(_) => "chat_list",
        B::ChannelCreate(_) => "channel_create",
        B::ChannelJoin(_) => "channel_join",
        B::ChannelLeave(_) => "channel_leave",
        B::ChannelList(_) => "channel_list",
        B::ChannelMembers(_) => "channel_members",
        B::ResolveUser(_) => "resolve_user",
        B::Ping(_) => "ping",
        B::PushAck(_) => "push_ack",
        B::WhereIs(_) => "where_is",
        B::Cluster(_) => "cluster",
        B::ChannelAdd(_) => "channel_add",
        B::ChannelRemove(_) => "channel_remove",
        B::ChannelSetAdmin(_) => "channel_set_admin",
        B::ChangePassword(_) => "change_password",
        B::Logout(_) => "logout",
        B::Typing(_) => "typing",
        B::SetPresence(_) => "set_presence",
        B::Presence(_) => "presence",
    }
}

impl NodeMetrics {
    /// The handle of node `node_id`.
    pub fn new(node_id: u32) -> Self {
        let node = SharedString::from(Arc::<str>::from(node_id.to_string()));
        let h = Handles {
            requests: DashMap::new(),
            request_seconds: DashMap::new(),
            rate_limited: DashMap::new(),
            auth_failures: DashMap::new(),
            handshakes: DashMap::new(),
            handshake_seconds: metrics::histogram!("meshchat_handshake_duration_seconds", "node" => node.clone()),
            pushes: counter!("meshchat_pushes_total", "node" => node.clone()),
            early_served: counter!("meshchat_early_data_requests_total", "node" => node.clone(), "outcome" => "served"),
            early_refused: counter!("meshchat_early_data_requests_total", "node" => node.clone(), "outcome" => "too_early"),
            presence_node: counter!("meshchat_presence_changes_total", "node" => node.clone(), "scope" => "node"),
            presence_cluster: counter!("meshchat_presence_changes_total", "node" => node.clone(), "scope" => "cluster"),
            messages_sent: counter!("meshchat_messages_sent_total", "node" => node.clone()),
            append_seconds: metrics::histogram!("meshchat_storage_duration_seconds", "node" => node.clone(), "op" => "append"),
            delivery_seconds: metrics::histogram!("meshchat_delivery_latency_seconds", "node" => node.clone()),
            exporting: matches!(RECORDER.get(), Some(Some(_))),
            peer_totals: DashMap::new(),
            peers_seen: DashMap::new(),
        };
        let m = Self {
            node,
            established: Arc::new(AtomicU64::new(0)),
            h: Arc::new(h),
        };
        m.preregister();
        m
    }

    /// Registers at 0 the series an alert or a dashboard panel takes a `rate()` of but that
    /// would otherwise appear only at their first event: `rate()` and `increase()` miss
    /// whatever happened before the first scrape that saw the series.
    fn preregister(&self) {
        let h = &self.h;
        for reason in [
            ErrorCode::BadCredentials,
            ErrorCode::TokenExpired,
            ErrorCode::TokenInvalid,
            ErrorCode::RateLimited,
            ErrorCode::Overloaded,
        ] {
            let reason = reason.as_str_name();
            let _ = cached(
                &h.auth_failures,
                reason,
                || counter!("meshchat_auth_failures_total", "node" => self.node.clone(), "reason" => reason),
            );
        }
        for kind in ["send", "receipt", "react", "login", "register"] {
            let _ = cached(
                &h.rate_limited,
                kind,
                || counter!("meshchat_rate_limited_total", "node" => self.node.clone(), "type" => kind),
            );
        }
        for (kind, outcome) in [
            ("send", "ok"),
            ("send", "RATE_LIMITED"),
            ("send", "OVERLOADED"),
            ("login", "ok"),
            ("login", "BAD_CREDENTIALS"),
            ("register", "ok"),
            ("authenticate", "ok"),
            ("authenticate", "TOKEN_EXPIRED"),
        ] {
            let _ = cached(
                &h.requests,
                (kind, outcome),
                || counter!("meshchat_requests_total", "node" => self.node.clone(), "type" => kind, "outcome" => outcome),
            );
        }
        for outcome in ["ok", "failed", "timeout", "refused"] {
            let _ = cached(
                &h.handshakes,
                outcome,
                || counter!("meshchat_handshakes_total", "node" => self.node.clone(), "outcome" => outcome),
            );
        }
    }

    /// The `node` label's value.
    pub fn node_label(&self) -> &str {
        &self.node
    }

    /// A request answered: its type, its outcome (`ok` or an error code name), its latency.
    pub fn request(&self, kind: &'static str, outcome: &'static str, took: Duration) {
        let h = &self.h;
        cached(&h.requests, (kind, outcome), || {
            counter!("meshchat_requests_total", "node" => self.node.clone(), "type" => kind, "outcome" => outcome)
        })
        .increment(1);
        // Successful requests only: a refusal (RATE_LIMITED, FORBIDDEN, ...) is answered
        // before any work and would pull the latency of the work down.
        if outcome == "ok" {
            cached(&h.request_seconds, kind, || {
                metrics::histogram!("meshchat_request_duration_seconds", "node" => self.node.clone(), "type" => kind)
            })
            .record(took);
        }
        if outcome == ErrorCode::RateLimited.as_str_name() {
            cached(&h.rate_limited, kind, || {
                counter!("meshchat_rate_limited_total", "node" => self.node.clone(), "type" => kind)
            })
            .increment(1);
        }
        if matches!(kind, "register" | "login" | "authenticate") && outcome != "ok" {
            cached(&h.auth_failures, outcome, || {
                counter!("meshchat_auth_failures_total", "node" => self.node.clone(), "reason" => outcome)
            })
            .increment(1);
        }
    }

    /// A handshake ended: `ok`, `failed`, `timeout` or `refused`; its duration if it ran.
    pub fn handshake(&self, outcome: &'static str, took: Option<Duration>) {
        cached(&self.h.handshakes, outcome, || {
            counter!("meshchat_handshakes_total", "node" => self.node.clone(), "outcome" => outcome)
        })
        .increment(1);
        if let Some(took) = took {
            self.h.handshake_seconds.record(took);
        }
    }

    /// A connection finished its handshake; the guard counts it until dropped.
    pub fn established(&self) -> EstablishedGuard {
        self.established.fetch_add(1, Ordering::Relaxed);
        EstablishedGuard(self.established.clone())
    }

    /// Connections with their handshake done and their session running.
    pub fn established_now(&self) -> u64 {
        self.established.load(Ordering::Relaxed)
    }

    /// A request read from 0-RTT early data: served, or refused `TOO_EARLY`.
    pub fn early_request(&self, served: bool) {
        if served {
            self.h.early_served.increment(1);
        } else {
            self.h.early_refused.increment(1);
        }
    }

    /// `n` push frames written to a connection.
    pub fn pushes(&self, n: usize) {
        if n > 0 {
            self.h.pushes.increment(n as u64);
        }
    }

    /// A message stored (not a duplicate) and about to be acked.
    pub fn message_sent(&self) {
        self.h.messages_sent.increment(1);
    }

    /// Presence changes published: `node` told to peers, `cluster` to be pushed to contacts.
    pub fn presence_changes(&self, node: usize, cluster: usize) {
        self.h.presence_node.increment(node as u64);
        self.h.presence_cluster.increment(cluster as u64);
    }

    /// A message append's latency as the node saw it.
    pub fn append(&self, took: Duration) {
        self.h.append_seconds.record(took);
    }

    /// A push was queued on this node's connections (`delivery`): if it carries a message,
    /// records the time since the message's id was issued (just before its append, on the
    /// sender's node: its clock, at millisecond resolution).
    pub fn delivered(
        &self,
        push: &bytes::Bytes,
        delivery: &meshchat_backplane::delivery::Delivery,
    ) {
        if !self.h.exporting || delivery.queued == 0 {
            return;
        }
        if let Some(age) = message_age(push, std::time::SystemTime::now()) {
            self.h.delivery_seconds.record(age);
        }
    }

    /// Sets a node gauge (scrape time).
    pub fn gauge(&self, name: &'static str, value: f64) {
        metrics::gauge!(name, "node" => self.node.clone()).set(value);
    }

    /// Sets a node gauge with one more label (scrape time).
    pub fn gauge_with(&self, name: &'static str, key: &'static str, label: String, value: f64) {
        metrics::gauge!(name, "node" => self.node.clone(), key => label).set(value);
    }

    /// Sets a node counter kept elsewhere to its total (scrape time).
    pub fn counter_total(&self, name: &'static str, total: u64) {
        counter!(name, "node" => self.node.clone()).absolute(total);
    }

    /// Sets a node counter kept elsewhere, with one more label, to its total (scrape time).
    pub fn counter_total_with(
        &self,
        name: &'static str,
        key: &'static str,
        label: &'static str,
        total: u64,
    ) {
        counter!(name, "node" => self.node.clone(), key => label).absolute(total);
    }

    /// Sets the series of every peer in the member set (scrape time): link state, queue, RTT
    /// and counters. The mesh's counters restart from zero when a peer leaves the member set
    /// and comes back; the exported ones carry on from their earlier totals. A peer seen
    /// before and absent now reads `meshchat_peer_up` 0 and an empty queue.
    pub fn peers(&self, peers: &[(NodeId, bool, Option<PeerCounters>)]) {
        let now: Vec<String> = peers.iter().map(|(id, _, _)| id.0.to_string()).collect();
        for ((_, up, c), label) in peers.iter().zip(&now) {
            self.h.peers_seen.insert(label.clone(), ());
            self.gauge_with("meshchat_peer_member", "peer", label.clone(), 1.0);
            self.gauge_with(
                "meshchat_peer_up",
                "peer",
                label.clone(),
                f64::from(u8::from(*up)),
            );
            let Some(c) = c else { continue };
            self.gauge_with(
                "meshchat_peer_queue_depth",
                "peer",
                label.clone(),
                c.queued as f64,
            );
            self.gauge_with(
                "meshchat_peer_queue_bytes",
                "peer",
                label.clone(),
                c.queued_bytes as f64,
            );
            // NaN while the link is down: no stale estimate (graphs show a gap).
            self.gauge_with(
                "meshchat_peer_rtt_seconds",
                "peer",
                label.clone(),
                c.rtt.filter(|_| *up).map_or(f64::NAN, |r| r.as_secs_f64()),
            );
            for (name, v) in [
                ("meshchat_peer_envelopes_sent_total", c.envelopes_sent),
                (
                    "meshchat_peer_envelopes_received_total",
                    c.envelopes_received,
                ),
                ("meshchat_peer_dropped_total", c.dropped),
                ("meshchat_peer_connects_total", c.connects),
            ] {
                let total = self
                    .h
                    .peer_totals
                    .entry((name, label.clone()))
                    .or_default()
                    .read(c.incarnation, v);
                counter!(name, "node" => self.node.clone(), "peer" => label.clone())
                    .absolute(total);
            }
        }
        for gone in self.h.peers_seen.iter().map(|e| e.key().clone()) {
            if !now.contains(&gone) {
                self.gauge_with("meshchat_peer_member", "peer", gone.clone(), 0.0);
                self.gauge_with("meshchat_peer_rtt_seconds", "peer", gone.clone(), f64::NAN);
                self.gauge_with("meshchat_peer_up", "peer", gone.clone(), 0.0);
                self.gauge_with("meshchat_peer_queue_depth", "peer", gone.clone(), 0.0);
                self.gauge_with("meshchat_peer_queue_bytes", "peer", gone, 0.0);
            }
        }
    }
}

/// The fields of a `Push` the delivery latency needs: the message's id, if it is a message
/// (everything else in the frame is skipped by the decoder, the body included, uncopied).
#[derive(Clone, PartialEq, prost::Message)]
struct PushPeek {
    #[prost(message, optional, tag = "2")]
    message: Option<MessagePeek>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct MessagePeek {
    #[prost(uint64, tag = "1")]
    message_id: u64,
}

/// How long before `now` the message in `push` had its id issued (0 if the sender's clock is
/// ahead); `None` if the push is not a message.
fn message_age(push: &[u8], now: std::time::SystemTime) -> Option<Duration> {
    let id = <PushPeek as prost::Message>::decode(push)
        .ok()?
        .message?
        .message_id;
    let issued =
        std::time::UNIX_EPOCH + Duration::from_millis(meshchat_idgen::Snowflake(id).unix_ms());
    Some(now.duration_since(issued).unwrap_or_default())
}

/// The handle under `key`, registered by `make` on first use.
fn cached<K, H>(map: &DashMap<K, H>, key: K, make: impl FnOnce() -> H) -> H
where
    K: std::hash::Hash + Eq,
    H: Clone,
{
    if let Some(h) = map.get(&key) {
        return h.clone();
    }
    map.entry(key).or_insert_with(make).clone()
}

/// Counts one established connection while it lives.
#[derive(Debug)]
pub struct EstablishedGuard(Arc<AtomicU64>);

impl Drop for EstablishedGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Keeps the lines of a Prometheus text exposition that belong to node `node` or to no node
/// (the process's): several nodes in one process share the recorder.
pub fn only_node(text: &str, node: &str) -> String {
    let mine = format!("node=\"{node}\"");
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line.starts_with('#') || !line.contains("node=\"") || line.contains(&mine) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_node_keeps_this_nodes_series_and_the_process_ones() {
        let text = "# TYPE a counter\na{node=\"1\"} 3\na{node=\"12\"} 4\nprocess_x 5\n";
        assert_eq!(
            only_node(text, "1"),
            "# TYPE a counter\na{node=\"1\"} 3\nprocess_x 5\n"
        );
    }

    #[test]
    fn a_peer_counter_carries_on_across_incarnations() {
        let mut t = PeerTotal::default();
        assert_eq!(t.read(1, 5), 5);
        assert_eq!(t.read(1, 9), 9);
        // The peer left and came back: its new counters start from zero.
        assert_eq!(t.read(2, 0), 9);
        assert_eq!(t.read(2, 4), 13);
        assert_eq!(t.read(3, 1), 14);
        // A late read of an older incarnation does not count it again.
        assert_eq!(t.read(2, 4), 14);
    }

    #[test]
    fn a_message_push_gives_its_age_and_other_pushes_none() {
        use meshchat_proto::client::{self as pb, push};
        let issued_ms = meshchat_idgen::EPOCH_UNIX_MS + 1_000_000;
        let id = meshchat_idgen::Snowflake::from_parts(1_000_000, 3, 7).0;
        let frame = crate::node::encode_push(push::Event::Message(pb::Message {
            message_id: id,
            body: vec![b'x'; 300].into(),
            ..Default::default()
        }));
        let now = std::time::UNIX_EPOCH + Duration::from_millis(issued_ms + 42);
        assert_eq!(message_age(&frame, now), Some(Duration::from_millis(42)));
        // A sender's clock ahead of ours reads 0, not a panic.
        let before = std::time::UNIX_EPOCH + Duration::from_millis(issued_ms - 5);
        assert_eq!(message_age(&frame, before), Some(Duration::ZERO));
        let resync = crate::node::encode_push(push::Event::Resync(pb::Resync {}));
        assert_eq!(message_age(&resync, now), None);
    }

    #[test]
    fn outcomes_are_ok_or_the_error_code_name() {
        let ok: Result<(), ErrorCode> = Ok(());
        let err: Result<(), ErrorCode> = Err(ErrorCode::RateLimited);
        assert_eq!(outcome(&ok, |e| *e), "ok");
        assert_eq!(outcome(&err, |e| *e), "RATE_LIMITED");
    }
}
