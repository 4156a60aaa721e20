//! `meshchat-loadtest`: flags in; `report.json` + `report.html` out, and a one-screen
//! summary on stdout. Exits 1 when the run failed its checks (acked-undelivered messages,
//! wrong ids, duplicates, or connections that could not be opened).
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use meshchat_loadtest::cluster::Target;
use meshchat_loadtest::provision::Store;
use meshchat_loadtest::run::{RunConfig, run};
use meshchat_loadtest::sampler::Watched;
use meshchat_loadtest::scenario::{Scenario, Traffic, expand};
use meshchat_messaging::config::CassandraSettings;
use meshchat_messaging::dev::DevStorage;

/// meshchat load harness: N real QUIC connections, chat traffic, HDR latencies, reports.
#[derive(Parser, Debug, serde::Serialize)]
#[command(version)]
struct Cli {
    /// Start N local node processes (fresh temp dir; embedded store, or --storage cassandra)
    /// and test them.
    #[arg(long, conflicts_with = "server")]
    spawn_nodes: Option<u32>,
    /// `meshchat-node` binary for --spawn-nodes (default: next to this binary).
    #[arg(long)]
    node_bin: Option<PathBuf>,
    /// Data dir for --spawn-nodes (default: a temp dir, removed afterwards).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Address of a running node (repeat for several); users are sent to their home node.
    #[arg(long)]
    server: Vec<String>,
    /// The cluster's CA certificate (with --server).
    #[arg(long, requires = "server")]
    ca: Option<PathBuf>,
    /// The cluster's token signing secret file (with --server), to mint tokens.
    #[arg(long, requires = "server")]
    token_secret: Option<PathBuf>,
    /// The embedded store dir of a --server cluster, to provision users (else they must exist).
    #[arg(long, requires = "server")]
    store_dir: Option<PathBuf>,
    /// Pids of --server nodes on this machine, to sample their RSS and CPU.
    #[arg(long, value_delimiter = ',')]
    node_pid: Vec<u32>,
    /// The cluster's store: `embedded` (spawned nodes: in the data dir; --server: --store-dir)
    /// or `cassandra` (the server at --cql: spawned nodes use it, users are provisioned into
    /// it).
    #[arg(long, value_enum, default_value_t = StorageKind::Embedded)]
    storage: StorageKind,
    /// Cassandra contact points, `host:port` (comma-separated), with --storage cassandra.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:9042")]
    cql: Vec<String>,
    /// Cassandra keyspace, with --storage cassandra (default: with --spawn-nodes a fresh
    /// `meshchat_lt_<unix seconds>`, migrated before the nodes start; with --server `meshchat`).
    #[arg(long)]
    keyspace: Option<String>,
    /// Another process on this machine to sample, `NAME=PID` (repeatable), e.g. the
    /// Cassandra server: its CPU over the traffic phase and its peak RSS go in the report.
    #[arg(long)]
    watch_pid: Vec<String>,
    /// Scenarios: idle, direct, channel, reconnect, mixed (comma-separated, combinable).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "mixed")]
    scenario: Vec<Scenario>,
    /// Connections, one synthetic user each.
    #[arg(long, default_value_t = 1_000)]
    connections: usize,
    /// New connections per second during the ramp.
    #[arg(long, default_value_t = 2_000.0)]
    ramp_rate: f64,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 512)]
    concurrency: usize,
    /// Client UDP sockets.
    #[arg(long, default_value_t = 16)]
    endpoints: usize,
    /// Loopback source addresses (127.0.0.1 ..= 127.0.0.N) the sockets are spread over.
    #[arg(long, default_value_t = 4)]
    source_addrs: u8,
    /// Seconds of traffic (or of holding the connections, for idle) after the ramp.
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// 1:1 messages per second (direct).
    #[arg(long, default_value_t = 1_000.0)]
    rate: f64,
    /// Channel messages per second (channel).
    #[arg(long, default_value_t = 50.0)]
    channel_rate: f64,
    /// Channels to create (channel).
    #[arg(long, default_value_t = 10)]
    channels: usize,
    /// Members per channel (channel).
    #[arg(long, default_value_t = 50)]
    channel_size: usize,
    /// Share of connections dropped and re-established per round (reconnect).
    #[arg(long, default_value_t = 0.05)]
    reconnect_share: f64,
    /// Seconds between reconnect rounds (reconnect).
    #[arg(long, default_value_t = 5.0)]
    reconnect_every: f64,
    /// Contacts per user in direct (each user writes to a fixed set; 0: anyone, every
    /// message a new chat).
    #[arg(long, default_value_t = 16)]
    contacts: usize,
    /// Message body bytes.
    #[arg(long, default_value_t = 64)]
    body_bytes: usize,
    /// Sends in flight at once per generator; beyond it sends are skipped and counted.
    #[arg(long, default_value_t = 20_000)]
    max_inflight: usize,
    /// Longest wait for in-flight messages after the traffic stops, seconds.
    #[arg(long, default_value_t = 20)]
    drain: u64,
    /// Client QUIC keep-alive, seconds (below the node's idle timeout). It bounds how soon
    /// an idle client notices a dead node (keep-alive + the liveness timeout).
    #[arg(long, default_value_t = 2.0)]
    keep_alive: f64,
    /// Client liveness timeout, seconds: a connection silent this long after a send is
    /// declared dead (the client library's default unless given).
    #[arg(long)]
    liveness: Option<f64>,
    /// Client silence before it tries its new home ahead of the liveness timeout, seconds
    /// (0 turns it off; the client library's default unless given).
    #[arg(long)]
    suspect_after: Option<f64>,
    /// Kernel UDP buffer per client socket, bytes (capped by net.core.rmem_max).
    #[arg(long, default_value_t = 8 << 20)]
    udp_buffer: usize,
    /// First synthetic user id.
    #[arg(long, default_value_t = 1_000_000_000)]
    first_user: u64,
    /// Do not write synthetic users into the store.
    #[arg(long)]
    no_provision: bool,
    /// Seed of the random choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Directory for report.json, report.html and (spawned) nodes.log.
    #[arg(long, default_value = "loadtest-report")]
    out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
    /// Spawned nodes use Redis membership, on a `redis-server` the harness starts (implied
    /// by any --fault: a killed node leaves the ring only with dynamic membership).
    #[arg(long)]
    redis_membership: bool,
    /// A fault during the traffic, at seconds from its start (repeatable): kill:N (SIGKILL
    /// node N), restart:N, drain:N (POST /drain on node N's admin listener: off the ring, its
    /// users redirected; done when it exited), partition:N (cut node N off from the other nodes and Redis; needs
    /// root: the nodes then run in network namespaces), heal:N, redis-down, redis-up
    /// (empty), storage-down (the embedded store's write lock held by the harness: every
    /// write waits up to the nodes' busy timeout, 10 s, then fails), storage-up, flood:K (K users send at --flood-rate for 10 s). Example:
    /// --fault kill:2@20 --fault restart:2@40; a rolling restart: --fault drain:1@10
    /// --fault restart:1@20 --fault drain:2@35 ... Needs --spawn-nodes.
    #[arg(long, requires = "spawn_nodes")]
    fault: Vec<meshchat_loadtest::chaos::Fault>,
    /// Sends per second of each user of a flood:K fault: ten times the nodes' default
    /// `limits.send_rate_per_sec` (50).
    #[arg(long, default_value_t = 500.0)]
    flood_rate: f64,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum StorageKind {
    Embedded,
    Cassandra,
}

/// `NAME=PID`.
fn parse_watch(s: &str) -> anyhow::Result<Watched> {
    let (name, pid) = s
        .split_once('=')
        .with_context(|| format!("--watch-pid {s:?}: expected NAME=PID"))?;
    let pid = pid
        .parse()
        .with_context(|| format!("--watch-pid {s:?}: bad pid"))?;
    Ok(Watched {
        name: name.to_owned(),
        pid,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let nofile = meshchat_loadtest::raise_fd_limit().context("raising the open-file limit")?;
    tracing::info!(nofile, "open-file limit");
    std::fs::create_dir_all(&cli.out).with_context(|| format!("creating {}", cli.out.display()))?;
    let watch = cli
        .watch_pid
        .iter()
        .map(|w| parse_watch(w))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let cassandra = match cli.storage {
        StorageKind::Embedded => None,
        StorageKind::Cassandra => Some(CassandraSettings {
            nodes: cli.cql.clone(),
            keyspace: cli.keyspace.clone().unwrap_or_else(|| {
                if cli.spawn_nodes.is_some() {
                    let secs = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    format!("meshchat_lt_{secs}")
                } else {
                    "meshchat".into()
                }
            }),
            ..CassandraSettings::default()
        }),
    };
    let target = match cli.spawn_nodes {
        Some(n) => {
            let bin = match &cli.node_bin {
                Some(b) => b.clone(),
                None => std::env::current_exe()?
                    .parent()
                    .context("binary without a directory")?
                    .join("meshchat-node"),
            };
            anyhow::ensure!(
                bin.exists(),
                "{} not found: build it (cargo build --release) or pass --node-bin",
                bin.display()
            );
            let netns = cli.fault.iter().any(|f| {
                matches!(
                    f.action,
                    meshchat_loadtest::chaos::Action::Partition(_)
                        | meshchat_loadtest::chaos::Action::Heal(_)
                )
            });
            // Nodes in namespaces have loopbacks of their own: a Cassandra on this machine's
            // loopback is out of their reach.
            anyhow::ensure!(
                !(netns && cassandra.is_some()),
                "partition faults need --storage embedded (nodes in network namespaces cannot reach a Cassandra on loopback)"
            );
            Target::spawn(
                n,
                &bin,
                cli.data_dir.clone(),
                &cli.out.join("nodes.log"),
                cli.redis_membership || !cli.fault.is_empty(),
                cassandra.map_or(DevStorage::Embedded, DevStorage::Cassandra),
                netns,
                cli.source_addrs,
            )
            .await?
        }
        None => {
            anyhow::ensure!(
                !cli.server.is_empty(),
                "give --spawn-nodes N, or --server ADDR with --ca and --token-secret"
            );
            let ca = cli.ca.clone().context("--server needs --ca")?;
            let secret = cli
                .token_secret
                .clone()
                .context("--server needs --token-secret")?;
            Target::external(
                cli.server.clone(),
                ca,
                &secret,
                &cli.node_pid,
                match cassandra {
                    Some(c) => Some(Store::Cassandra(c)),
                    None => cli.store_dir.clone().map(Store::Embedded),
                },
            )?
        }
    };
    let cfg = RunConfig {
        scenarios: expand(&cli.scenario),
        connections: cli.connections,
        endpoints: cli.endpoints,
        source_addrs: cli.source_addrs,
        ramp_rate: cli.ramp_rate,
        concurrency: cli.concurrency,
        duration: Duration::from_secs(cli.duration),
        drain: Duration::from_secs(cli.drain),
        traffic: Traffic {
            direct_rate: cli.rate,
            channel_rate: cli.channel_rate,
            channels: cli.channels,
            channel_size: cli.channel_size,
            reconnect_share: cli.reconnect_share,
            reconnect_every_secs: cli.reconnect_every,
            contacts: cli.contacts,
            body_bytes: cli.body_bytes,
            max_inflight: cli.max_inflight,
            seed: cli.seed,
        },
        first_user: cli.first_user,
        provision: !cli.no_provision,
        keep_alive: Duration::from_secs_f64(cli.keep_alive.clamp(0.5, 3600.0)),
        liveness: cli
            .liveness
            .map(|s| Duration::from_secs_f64(s.clamp(0.5, 3600.0))),
        suspect_after: cli
            .suspect_after
            .map(|s| Duration::from_secs_f64(s.clamp(0.0, 3600.0))),
        udp_buffer: cli.udp_buffer,
        out: cli.out.clone(),
        progress: !cli.no_progress,
        command: std::env::args().collect(),
        settings: serde_json::to_value(&cli)?,
        faults: cli.fault.clone(),
        flood_rate: cli.flood_rate,
        watch,
    };
    let report = run(cfg, target).await?;
    let c = &report.connections;
    let m = &report.messages;
    println!(
        "connections {}/{} (failed {}), ramp {:.1}s at {:.0}/s, handshake p99 {:.1} ms",
        c.established,
        c.requested,
        c.failed,
        c.ramp_secs,
        c.connects_per_sec,
        c.handshake.p99_us as f64 / 1000.0
    );
    println!(
        "messages sent {} acked {} failed {} delivered {}; {:.0} acked/s",
        m.sent, m.acked, m.send_failed, m.delivered, m.acked_per_sec
    );
    println!(
        "ack p50/p99 {:.2}/{:.2} ms; end-to-end p50/p99/max {:.2}/{:.2}/{:.2} ms",
        m.ack_latency.p50_us as f64 / 1000.0,
        m.ack_latency.p99_us as f64 / 1000.0,
        m.e2e_latency.p50_us as f64 / 1000.0,
        m.e2e_latency.p99_us as f64 / 1000.0,
        m.e2e_latency.max_us as f64 / 1000.0
    );
    for n in &report.nodes {
        println!(
            "{}: {} connections, RSS {:.1} -> {:.1} MiB ({}), CPU {:.0}% in traffic",
            n.name,
            n.connections,
            n.rss_before as f64 / 1048576.0,
            n.rss_held as f64 / 1048576.0,
            n.rss_per_connection
                .map_or("-".into(), |b| format!("{b:.0} B/connection")),
            n.cpu_traffic_pct
        );
    }
    let node_cpu: f64 = report.nodes.iter().map(|n| n.cpu_traffic_pct).sum();
    if m.acked_per_sec > 0.0 {
        println!(
            "node CPU {:.0}% of a core in traffic (all nodes), {:.0} us per acked message",
            node_cpu,
            node_cpu / 100.0 / m.acked_per_sec * 1e6
        );
    }
    for o in &report.others {
        println!(
            "{} (pid {}): CPU {:.0}% in traffic, RSS max {:.1} MiB{}",
            o.name,
            o.pid,
            o.cpu_traffic_pct,
            o.rss_max as f64 / 1048576.0,
            if m.acked_per_sec > 0.0 {
                format!(
                    ", {:.0} us per acked message",
                    o.cpu_traffic_pct / 100.0 / m.acked_per_sec * 1e6
                )
            } else {
                String::new()
            }
        );
    }
    for f in &report.faults {
        println!(
            "fault {:?} at {:.1}s: {}{}",
            f.fault.action,
            f.done_at_secs,
            if f.ok { "done" } else { "FAILED " },
            if f.victims > 0 {
                format!(" ({} connections on it)", f.victims)
            } else {
                f.detail.clone()
            }
        );
    }
    let r = &report.rehome;
    if r.victims > 0 {
        println!(
            "re-homed {}/{}: p50/p99/max {:.2}/{:.2}/{:.2} s after the kill",
            r.rehomed,
            r.victims,
            r.latency.p50_us as f64 / 1e6,
            r.latency.p99_us as f64 / 1e6,
            r.latency.max_us as f64 / 1e6
        );
    }
    println!("acked but undelivered: {}", m.acked_undelivered);
    println!(
        "{}; reports in {}",
        if report.passed { "PASSED" } else { "FAILED" },
        report.out_note(&cli.out)
    );
    if !report.passed {
        for f in &report.failures {
            println!("  - {f}");
        }
        std::process::exit(1);
    }
    Ok(())
}
