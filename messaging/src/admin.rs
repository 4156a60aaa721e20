//! The admin HTTP listener (`[admin] listen`): liveness, readiness, Prometheus metrics and a
//! JSON view of the cluster as this node sees it. axum over HTTP/1.1; no authentication, so
//! it belongs on loopback or a management network (docs/OPERATIONS.md).
//!
//! - `GET /healthz`: 200 while the process serves HTTP at all.
//! - `GET /readyz`: 200 `ready`, or 503 with one line per unmet condition: the node is not
//!   shutting down, holds its worker-id lease (not fenced), is on its own ring, its client
//!   socket's reads are not failing, and its storage answers a read within a second.
//! - `GET /metrics`: this node's series and the process's, Prometheus text format
//!   ([`crate::metrics`]); scrape-time gauges are refreshed first.
//! - `GET /cluster`: node id, ring epoch and members, peer links with their counters,
//!   connections, lease, draining.
//! - `POST /drain`: starts a drain ([`crate::drain`]): 202, or 409 outside a cluster, with no
//!   other node on the ring, or while another static member drains. It must carry the header `x-meshchat-admin: drain`: a
//!   browser on the host cannot send that header cross-origin without a CORS preflight,
//!   which this listener never answers, so a web page cannot drain the node.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use meshchat_backplane::mesh::Mesh;
use meshchat_idgen::ChannelId;
use meshchat_storage::EmbeddedStore;
use serde_json::json;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::admission::HandshakeGate;
use crate::node::Node;
use crate::server::StartError;

/// How long `/readyz` waits for the storage read.
const STORAGE_PROBE: Duration = Duration::from_secs(1);

/// Reads of the client socket count as failing (`/readyz` 503) once a run of failures, with no
/// read that worked between them, has lasted this long: a lone transient error is no fault.
const RECV_FAILING_FOR: Duration = Duration::from_secs(1);

/// ... and while the run's latest failure is at most this old: the reader waits up to
/// [`meshchat_edge::udp::MAX_RECV_PAUSE`] between attempts while reads fail, and a socket
/// nothing arrives on is not read at all, so an old run proves nothing about the socket now
/// (an idle node must not stay unready).
const RECV_FAILING_RECENT: Duration = Duration::from_secs(3);
const _: () =
    assert!(RECV_FAILING_RECENT.as_millis() > 2 * meshchat_edge::udp::MAX_RECV_PAUSE.as_millis());

/// What the admin handlers read. Weak references: the listener must not keep the node or
/// its store alive past a shutdown.
#[derive(Clone)]
pub(crate) struct AdminState {
    pub loops: Arc<crate::server::LoopWatch>,
    pub node: Weak<Node>,
    pub mesh: Option<Weak<Mesh>>,
    pub store: Option<Weak<EmbeddedStore>>,
    pub gate: Arc<HandshakeGate>,
    pub tickets: Arc<crate::tickets::TicketStore>,
    pub stop: watch::Receiver<bool>,
}

/// Binds the admin listener's address (first thing at start: a node that cannot serve it must
/// not join the cluster) and installs the metrics recorder, before the node registers its
/// metric handles.
pub(crate) async fn bind(listen: SocketAddr) -> Result<tokio::net::TcpListener, StartError> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| StartError::Other(format!("admin listener {listen}: {e}")))?;
    crate::metrics::prometheus();
    Ok(listener)
}

/// Serves the admin routes on `listener` until `until` turns true (the end of the node's
/// shutdown, so `/readyz` answers 503 while it drains). Returns the bound address and the
/// server's task.
pub(crate) fn start(
    listener: tokio::net::TcpListener,
    state: AdminState,
    mut until: watch::Receiver<bool>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), StartError> {
    let addr = listener
        .local_addr()
        .map_err(|e| StartError::Other(format!("admin listener address: {e}")))?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/cluster", get(cluster))
        .route("/drain", post(drain))
        .with_state(state);
    let task = tokio::spawn(async move {
        let shutdown = async move {
            let _ = until.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            warn!(error = %e, "admin listener failed");
        }
        debug!("admin listener stopped");
    });
    info!(%addr, "admin listener up");
    Ok((addr, task))
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// The unmet readiness conditions (empty: ready).
async fn unready(s: &AdminState) -> Vec<String> {
    let mut failed = Vec::new();
    let Some(node) = s.node.upgrade() else {
        return vec!["node stopped".into()];
    };
    if *s.stop.borrow() {
        failed.push("node shutting down".into());
    }
    if node.drain().is_draining() {
        failed.push("draining: leaving the ring, users moving to their next homes".into());
    }
    if !node.lease_gate().allows() {
        failed
            .push("worker-id lease not held (still starting, or fenced: no ids, no logins)".into());
    }
    if let Some(mesh) = s.mesh.as_ref().and_then(Weak::upgrade)
        && !node.drain().is_draining()
        && !mesh.ring().members().contains(&mesh.me())
    {
        failed.push(format!(
            "not on the ring yet (epoch {})",
            mesh.current_epoch()
        ));
    }
    if let Some(run) = s.loops.recv.failing_now(
        std::time::Instant::now(),
        RECV_FAILING_FOR,
        RECV_FAILING_RECENT,
    ) {
        failed.push(format!(
            "client socket: every read failed for {:.1} s ({} in a row), latest: {}",
            run.last.duration_since(run.since).as_secs_f64(),
            run.in_row,
            run.error
        ));
    }
    match tokio::time::timeout(STORAGE_PROBE, node.storage.channel(ChannelId(0))).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => failed.push(format!("storage: {e}")),
        Err(_) => failed.push(format!(
            "storage did not answer a read within {} ms",
            STORAGE_PROBE.as_millis()
        )),
    }
    failed
}

async fn readyz(State(s): State<AdminState>) -> Response {
    let failed = unready(&s).await;
    if failed.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        let mut body = String::from("not ready:\n");
        for f in failed {
            body.push_str(&f);
            body.push('\n');
        }
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

async fn metrics(State(s): State<AdminState>) -> Response {
    let Some(handle) = crate::metrics::prometheus() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "another metrics recorder is installed in this process\n",
        )
            .into_response();
    };
    let Some(node) = s.node.upgrade() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "node stopped\n").into_response();
    };
    let ready = unready(&s).await.is_empty();
    refresh_gauges(&s, &node, ready);
    handle.run_upkeep();
    let text = crate::metrics::only_node(&handle.render(), node.metrics.node_label());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Scrape-time values: read from state the node keeps anyway.
fn refresh_gauges(s: &AdminState, node: &Node, ready: bool) {
    let m = &node.metrics;
    let handshaking = s.gate.in_progress() as f64;
    m.gauge_with(
        "meshchat_connections",
        "state",
        "handshaking".into(),
        handshaking,
    );
    m.gauge_with(
        "meshchat_connections",
        "state",
        "established".into(),
        m.established_now() as f64,
    );
    m.gauge_with(
        "meshchat_connections",
        "state",
        "authenticated".into(),
        node.registry.live_connections() as f64,
    );
    m.counter_total(
        "meshchat_push_queue_full_total",
        node.registry.cut_off_total(),
    );
    // The endpoint loops (none on quinn's endpoint): connections each holds, and datagrams
    // dropped on the way in (a loop's queue full) or out (the socket's buffer full).
    let loops: Vec<meshchat_edge::EdgeStats> =
        s.loops.loops.lock().iter().map(|r| *r.borrow()).collect();
    if !loops.is_empty() {
        for (k, l) in loops.iter().enumerate() {
            m.gauge_with(
                "meshchat_endpoint_loop_connections",
                "loop",
                k.to_string(),
                l.connections as f64,
            );
        }
        m.counter_total_with(
            "meshchat_endpoint_datagrams_dropped_total",
            "reason",
            "socket_full",
            loops.iter().map(|l| l.send_dropped).sum(),
        );
        m.counter_total_with(
            "meshchat_endpoint_datagrams_dropped_total",
            "reason",
            "send_error",
            loops.iter().map(|l| l.send_failed).sum(),
        );
        m.counter_total_with(
            "meshchat_endpoint_datagrams_dropped_total",
            "reason",
            "loop_queue_full",
            s.loops
                .queue_dropped
                .load(std::sync::atomic::Ordering::Relaxed),
        );
    }
    if !loops.is_empty() {
        m.counter_total("meshchat_endpoint_recv_errors_total", s.loops.recv.errors());
    }
    if let Some(store) = s.store.as_ref().and_then(Weak::upgrade) {
        m.gauge("meshchat_store_queue_depth", store.queue_depth() as f64);
    }
    let (tickets, ticket_bytes) = s.tickets.usage();
    m.gauge("meshchat_tls_tickets", tickets as f64);
    m.gauge("meshchat_tls_ticket_bytes", ticket_bytes as f64);
    m.gauge(
        "meshchat_argon2_in_progress",
        node.auth.hashes_in_progress() as f64,
    );
    m.counter_total(
        "meshchat_argon2_rejected_total",
        node.auth.hash_rejections(),
    );
    m.gauge(
        "meshchat_lease_held",
        if node.lease_gate().allows() { 1.0 } else { 0.0 },
    );
    m.gauge("meshchat_ready", if ready { 1.0 } else { 0.0 });
    let now = crate::auth::now_secs() as f64;
    for (which, at) in node.cert_expiry() {
        if let Some(at) = at {
            m.gauge_with(
                "meshchat_certificate_expiry_seconds",
                "cert",
                which.to_owned(),
                at as f64 - now,
            );
        }
    }
    m.gauge(
        "meshchat_draining",
        if node.drain().is_draining() { 1.0 } else { 0.0 },
    );
    if let Some(mesh) = s.mesh.as_ref().and_then(Weak::upgrade) {
        m.gauge("meshchat_ring_epoch", mesh.current_epoch() as f64);
        m.gauge("meshchat_ring_members", mesh.ring().members().len() as f64);
        let peers: Vec<_> = mesh
            .peer_ids()
            .into_iter()
            .map(|p| (p, mesh.peer_up(p), mesh.peer_stats(p)))
            .collect();
        m.peers(&peers);
    } else {
        m.gauge("meshchat_ring_members", 1.0);
    }
    metrics_process::Collector::default().collect();
}

async fn cluster(State(s): State<AdminState>) -> Response {
    let Some(node) = s.node.upgrade() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "node stopped\n").into_response();
    };
    let gate = node.lease_gate();
    let mut view = json!({
        "node_id": node.config.node_id,
        "pid": std::process::id(),
        "advertise": node.config.advertised(),
        "connections": {
            "handshaking": s.gate.in_progress(),
            "established": node.metrics.established_now(),
            "authenticated": node.registry.live_connections(),
        },
        // Remaining validity; null without a lease to renew (a static cluster).
        "lease": {
            "held": gate.allows(),
            "remaining_ms": (gate.valid_until_ms() != u64::MAX)
                .then(|| gate.valid_until_ms().saturating_sub(gate.now_ms())),
        },
        "shutting_down": *s.stop.borrow(),
        "draining": node.drain().is_draining(),
    });
    if let Some(mesh) = s.mesh.as_ref().and_then(Weak::upgrade) {
        let peers: Vec<_> = mesh
            .peer_ids()
            .into_iter()
            .map(|p| {
                let c = mesh.peer_stats(p).unwrap_or_default();
                json!({
                    "id": p.0,
                    "up": mesh.peer_up(p),
                    "envelopes_sent": c.envelopes_sent,
                    "envelopes_received": c.envelopes_received,
                    "dropped": c.dropped,
                    "connects": c.connects,
                    "queued": c.queued,
                    "queued_bytes": c.queued_bytes,
                })
            })
            .collect();
        view["ring"] = json!({
            "epoch": mesh.current_epoch(),
            "members": mesh.ring().members().iter().map(|m| m.0).collect::<Vec<_>>(),
            // A static cluster's members that said they drain (kept off the ring).
            "draining": mesh.draining_members().iter().map(|m| m.0).collect::<Vec<_>>(),
        });
        view["peers"] = json!(peers);
    }
    axum::Json(view).into_response()
}

/// The header a drain request must carry (see the module doc).
pub const DRAIN_HEADER: (&str, &str) = ("x-meshchat-admin", "drain");

async fn drain(State(s): State<AdminState>, headers: axum::http::HeaderMap) -> Response {
    if headers.get(DRAIN_HEADER.0).and_then(|v| v.to_str().ok()) != Some(DRAIN_HEADER.1) {
        return (
            StatusCode::FORBIDDEN,
            format!(
                "a drain request carries the header `{}: {}`\n",
                DRAIN_HEADER.0, DRAIN_HEADER.1
            ),
        )
            .into_response();
    }
    let Some(node) = s.node.upgrade() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "node stopped\n").into_response();
    };
    let others = s.mesh.as_ref().and_then(Weak::upgrade).map_or(0, |m| {
        let me = m.me();
        m.ring().members().iter().filter(|&&n| n != me).count()
    });
    let timeout = node.config.cluster.drain_timeout;
    match crate::drain::Drain::start(&node, others, timeout).await {
        Ok(started) => {
            let what = match started {
                crate::drain::DrainStarted::Started => "draining",
                crate::drain::DrainStarted::AlreadyDraining => "already draining",
            };
            let conns = node.registry.live_connections();
            // Redirects go out at 400 a second (the mesh's pacing).
            let needs = Duration::from_secs(conns / 400 + 1);
            let mut body = format!(
                "{what}: {conns} authenticated connections; the node stops once they moved, or \
                 after {} s\n",
                timeout.as_secs()
            );
            if needs > timeout {
                body.push_str(&format!(
                    "warning: redirecting {conns} connections takes about {} s, more than \
                     cluster.drain_timeout: the rest are closed and fail over\n",
                    needs.as_secs()
                ));
            }
            (StatusCode::ACCEPTED, body).into_response()
        }
        Err(e @ (crate::drain::DrainError::NotServing | crate::drain::DrainError::Redis(_))) => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response()
        }
        Err(e) => (StatusCode::CONFLICT, format!("{e}\n")).into_response(),
    }
}

/// How long [`call`] waits for an answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Calls the admin listener at `addr`: `method` `path` (HTTP/1.1, one request per connection,
/// carrying [`DRAIN_HEADER`]). Returns the status and the body, or an error after 10 s.
/// For `meshchat-node drain` and tests.
pub async fn call(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    tokio::time::timeout(CALL_TIMEOUT, call_once(addr, method, path))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("{addr} did not answer within {} s", CALL_TIMEOUT.as_secs()),
            )
        })?
}

async fn call_once(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    use http_body_util::BodyExt;
    let io = |e: &dyn std::fmt::Display| std::io::Error::other(e.to_string());
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| io(&e))?;
    let driver = tokio::spawn(conn);
    let request = axum::http::Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, addr.to_string())
        .header(DRAIN_HEADER.0, DRAIN_HEADER.1)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| io(&e))?;
    let response = sender.send_request(request).await.map_err(|e| io(&e))?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| io(&e))?
        .to_bytes();
    driver.abort();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// A human summary of the node behind the admin listener at `addr` (`meshchat-node status`):
/// readiness, ring, peer links, connections and lease, from `/readyz` and `/cluster`; and
/// whether the node is ready.
pub async fn status(addr: SocketAddr) -> std::io::Result<(bool, String)> {
    let (ready_status, ready) = call(addr, "GET", "/readyz").await?;
    let (_, cluster) = call(addr, "GET", "/cluster").await?;
    let v: serde_json::Value = serde_json::from_str(&cluster)
        .map_err(|e| std::io::Error::other(format!("/cluster is not JSON: {e}")))?;
    let mut out = format!(
        "node {} (pid {}), clients dial {}\n",
        v["node_id"],
        v["pid"],
        v["advertise"].as_str().unwrap_or("?")
    );
    if ready_status == 200 {
        out.push_str("ready\n");
    } else {
        for line in ready.lines() {
            out.push_str(&format!("{line}\n"));
        }
    }
    let c = &v["connections"];
    out.push_str(&format!(
        "connections: {} handshaking, {} established, {} authenticated\n",
        c["handshaking"], c["established"], c["authenticated"]
    ));
    let lease = &v["lease"];
    out.push_str(&match lease["remaining_ms"].as_u64() {
        Some(ms) if lease["held"] == true => format!("lease: held, {ms} ms left\n"),
        Some(_) => "lease: NOT held (fenced, or still starting)\n".into(),
        None => "lease: none to lose (static cluster or a node alone)\n".into(),
    });
    if v["draining"] == true {
        out.push_str("draining\n");
    }
    if let Some(ring) = v.get("ring") {
        // A JSON array of ids, as "1, 2, 3".
        let ids = |a: &serde_json::Value| {
            a.as_array()
                .into_iter()
                .flatten()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        out.push_str(&format!(
            "ring: epoch {}, members {}\n",
            ring["epoch"],
            ids(&ring["members"])
        ));
        let draining = ids(&ring["draining"]);
        if !draining.is_empty() {
            out.push_str(&format!(
                "drained or draining (static members kept off the ring): {draining}\n"
            ));
        }
        for p in v["peers"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "  peer {}: {} (queued {} envelopes, {} bytes; sent {}, received {}, dropped {}, connects {})\n",
                p["id"],
                if p["up"] == true { "up" } else { "DOWN" },
                p["queued"],
                p["queued_bytes"],
                p["envelopes_sent"],
                p["envelopes_received"],
                p["dropped"],
                p["connects"]
            ));
        }
    }
    Ok((ready_status == 200, out))
}
