//! The `idle` scenario: N authenticated connections, held open, with the node's RSS sampled
//! before and after.
//!
//! Users are synthetic: tokens are minted with the cluster's token secret (the operator hands
//! the file to the load tester), so no password hashing is needed for 100k users. The node
//! verifies those tokens exactly as it verifies real ones.

use std::sync::Arc;
use std::time::{Duration, Instant};

use meshchat_client::{Client, ConnectOptions, Events};
use meshchat_idgen::UserId;
use meshchat_messaging::auth::Auth;
use serde::Serialize;
use tokio::sync::Semaphore;
use tracing::warn;

/// Settings of an idle run.
#[derive(Debug, Clone)]
pub struct IdleRun {
    /// Node address.
    pub server: String,
    /// Connection options (CA roots, keep-alive).
    pub options: ConnectOptions,
    /// Token secret of the cluster.
    pub secret: Vec<u8>,
    /// Connections to open.
    pub connections: usize,
    /// Client UDP sockets to spread them over.
    pub endpoints: usize,
    /// Handshakes in flight at once.
    pub concurrency: usize,
    /// How long to hold them once all are open.
    pub hold: Duration,
    /// The node's pid, to sample its RSS (same machine).
    pub node_pid: Option<u32>,
    /// First synthetic user id.
    pub first_user: u64,
}

/// What an idle run measured.
#[derive(Debug, Clone, Serialize)]
pub struct IdleReport {
    /// Connections asked for.
    pub requested: usize,
    /// Connections open and authenticated.
    pub established: usize,
    /// Connections that failed.
    pub failed: usize,
    /// Seconds to open them all.
    pub ramp_secs: f64,
    /// Handshake + authentication rate during the ramp.
    pub connects_per_sec: f64,
    /// Node RSS before opening connections, bytes.
    pub node_rss_before: Option<u64>,
    /// Node RSS with every connection open, after settling, bytes.
    pub node_rss_held: Option<u64>,
    /// (held - before) / established, bytes.
    pub node_rss_per_connection: Option<f64>,
    /// Connections still open at the end of the hold.
    pub still_open_after_hold: usize,
}

/// Runs the scenario.
pub async fn run(cfg: IdleRun) -> anyhow::Result<IdleReport> {
    let auth = Auth::new(&cfg.secret, Duration::from_secs(24 * 3600), 1);
    let mut endpoints = Vec::new();
    for _ in 0..cfg.endpoints.max(1) {
        endpoints.push(meshchat_client::conn::client_endpoint(
            &cfg.options,
            "127.0.0.1:0".parse()?,
        )?);
    }
    let rss_before = cfg.node_pid.and_then(|p| crate::proc_rss(p).ok());
    let gate = Arc::new(Semaphore::new(cfg.concurrency.max(1)));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..cfg.connections {
        let endpoint = endpoints[i % endpoints.len()].clone();
        let server = cfg.server.clone();
        let options = cfg.options.clone();
        let user = UserId(cfg.first_user + i as u64);
        let (token, _) = auth
            .mint(user, &format!("load-{}", user.0))
            .map_err(|e| anyhow::anyhow!("minting: {e}"))?;
        let gate = gate.clone();
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await.ok()?;
            let (client, events) = match Client::connect_with(endpoint, &server, options).await {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "connect failed");
                    return None;
                }
            };
            match client.authenticate(&token).await {
                Ok(_) => Some((client, events)),
                Err(e) => {
                    warn!(error = %e, "authenticate failed");
                    None
                }
            }
        });
    }
    let mut held: Vec<(Client, Events)> = Vec::with_capacity(cfg.connections);
    let mut failed = 0;
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Some(c)) => held.push(c),
            _ => failed += 1,
        }
    }
    let ramp = started.elapsed();
    // Let the node settle (handshake buffers freed, allocator steady) before sampling.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_held = cfg.node_pid.and_then(|p| crate::proc_rss(p).ok());
    tokio::time::sleep(cfg.hold).await;
    let still_open = held
        .iter()
        .filter(|(c, _)| c.conn().map(|c| c.is_open()).unwrap_or(false))
        .count();
    let established = held.len();
    for (c, _) in &held {
        c.close();
    }
    let per_conn = match (rss_before, rss_held) {
        (Some(b), Some(h)) if established > 0 => Some((h as f64 - b as f64) / established as f64),
        _ => None,
    };
    Ok(IdleReport {
        requested: cfg.connections,
        established,
        failed,
        ramp_secs: ramp.as_secs_f64(),
        connects_per_sec: established as f64 / ramp.as_secs_f64().max(1e-9),
        node_rss_before: rss_before,
        node_rss_held: rss_held,
        node_rss_per_connection: per_conn,
        still_open_after_hold: still_open,
    })
}
