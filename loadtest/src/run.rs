//! One experiment from start to report: reach or start the cluster, provision users, ramp
//! the fleet up, run the scenarios for the set time, drain, judge, and write the reports.
//! Bounded: every phase has a deadline, and the whole run stops by itself.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use meshchat_client::ConnectOptions;
use tracing::{info, warn};

use crate::chaos::{Fault, run_plan};
use crate::cluster::Target;
use crate::fleet::{Fleet, FleetConfig};
use crate::report::{
    Connections, Flood, Machine, Messages, NodeFigures, Reconnects, Rehome, Report,
};
use crate::sampler::{Sampler, Watched, proc_rss};
use crate::scenario::{self, Scenario, Traffic};
use crate::tracker::{Counters, Latency, Tracker};

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Scenarios (expanded).
    pub scenarios: BTreeSet<Scenario>,
    /// Connections (= synthetic users).
    pub connections: usize,
    /// Client UDP sockets.
    pub endpoints: usize,
    /// Loopback source addresses.
    pub source_addrs: u8,
    /// New connections per second during the ramp.
    pub ramp_rate: f64,
    /// Handshakes in flight at once.
    pub concurrency: usize,
    /// Seconds of traffic (or holding, for `idle`) after the ramp.
    pub duration: Duration,
    /// Longest wait for in-flight messages after the traffic stops.
    pub drain: Duration,
    /// Traffic settings.
    pub traffic: Traffic,
    /// First synthetic user id.
    pub first_user: u64,
    /// Write users into the store (when the harness knows where it is).
    pub provision: bool,
    /// Client keep-alive.
    pub keep_alive: Duration,
    /// Client liveness timeout (the library's default if `None`).
    pub liveness: Option<Duration>,
    /// Client silence before an early re-home (the library's default if `None`).
    pub suspect_after: Option<Duration>,
    /// Kernel UDP buffer per client socket.
    pub udp_buffer: usize,
    /// Where the reports go.
    pub out: PathBuf,
    /// Show a progress bar.
    pub progress: bool,
    /// The command line, for the report.
    pub command: Vec<String>,
    /// The flags, for the report.
    pub settings: serde_json::Value,
    /// Chaos faults during the traffic.
    pub faults: Vec<Fault>,
    /// Sends per second of each flooding user in a `flood:K` fault (ten times the nodes'
    /// `limits.send_rate_per_sec`).
    pub flood_rate: f64,
    /// Other processes on this machine to sample (a Cassandra server, say).
    pub watch: Vec<Watched>,
}

fn bar(show: bool, len: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb
}

fn rss(w: &Watched) -> u64 {
    proc_rss(w.pid).unwrap_or(0)
}

/// Runs the experiment against `target` and returns the report (also written to
/// `cfg.out`).
pub async fn run(cfg: RunConfig, mut target: Target) -> anyhow::Result<Report> {
    let started_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let tracker = Arc::new(Tracker::new());
    let users = crate::provision::tokens(&target.secret, cfg.first_user, cfg.connections)?;
    if cfg.provision {
        match &target.store {
            Some(store) => {
                let t = Instant::now();
                let made = crate::provision::users(store, cfg.first_user, cfg.connections).await?;
                info!(made, secs = t.elapsed().as_secs_f64(), "users provisioned");
            }
            None => warn!(
                "no store: assuming the synthetic users exist (pass --store-dir or --storage cassandra to provision them)"
            ),
        }
    }
    let mut options = ConnectOptions::new(meshchat_client::load_ca(&target.ca)?);
    options.keep_alive = cfg.keep_alive;
    if let Some(l) = cfg.liveness {
        options.liveness_timeout = l;
    }
    if let Some(s) = cfg.suspect_after {
        options.suspect_after = s;
    }
    options.event_buffer = 256;
    options.seeds = target.servers.clone();
    let fleet = Fleet::new(
        FleetConfig {
            servers: target.servers.clone(),
            options,
            connections: cfg.connections,
            endpoints: cfg.endpoints,
            source_addrs: cfg.source_addrs,
            source_ips: target.client_ips.clone(),
            ramp_rate: cfg.ramp_rate,
            concurrency: cfg.concurrency,
            udp_buffer: cfg.udp_buffer,
        },
        users,
        tracker.clone(),
    )?;
    let mut watched = target.nodes.clone();
    watched.push(Watched {
        name: "loadgen".into(),
        pid: std::process::id(),
    });
    watched.extend(cfg.watch.iter().cloned());
    let rss_before: Vec<u64> = target.nodes.iter().map(rss).collect();

    // Sampler and progress bar.
    let sampler = Sampler::new();
    let pb = bar(cfg.progress, cfg.connections as u64);
    pb.set_message("connecting");
    let sampler_task = {
        let pb = pb.clone();
        tokio::spawn(sampler.clone().run(
            fleet.clone(),
            tracker.clone(),
            watched.clone(),
            move |s| {
                pb.set_message(format!(
                    "{} open | {:.0} msg/s acked | e2e p99 {:.1} ms | {}",
                    s.connections_open,
                    s.acked_per_sec,
                    s.e2e_p99_us as f64 / 1000.0,
                    s.phase
                ));
            },
        ))
    };

    // Ramp (bounded: three times the planned time plus a minute).
    let ramp_started = Instant::now();
    let ramp_budget =
        Duration::from_secs_f64(cfg.connections as f64 / cfg.ramp_rate.max(1.0) * 3.0 + 60.0);
    {
        let pb = pb.clone();
        if tokio::time::timeout(ramp_budget, fleet.open_all(move || pb.inc(1)))
            .await
            .is_err()
        {
            warn!(
                ?ramp_budget,
                "ramp did not finish in time; going on with what is open"
            );
        }
    }
    let ramp_secs = ramp_started.elapsed().as_secs_f64();
    let established = Counters::get(&tracker.counters.established);
    // Let the nodes settle (handshake buffers freed) before reading their memory.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_held: Vec<u64> = target.nodes.iter().map(rss).collect();
    let per_server = fleet.per_server();
    let live = Arc::new(fleet.established());

    // Traffic.
    sampler.set_phase("setup");
    let channels = if cfg.scenarios.contains(&Scenario::Channel) {
        let tag = format!("{:08x}", rand::random::<u32>());
        let ch = scenario::setup_channels(&fleet, &live, &cfg.traffic, &tag).await;
        // Member caches on other nodes learn of the joins through the mesh.
        tokio::time::sleep(Duration::from_secs(1)).await;
        ch
    } else {
        Vec::new()
    };
    sampler.set_phase("traffic");
    let traffic_from = sampler.elapsed();
    pb.set_length(cfg.duration.as_secs().max(1));
    pb.set_position(0);
    let until = tokio::time::Instant::now() + cfg.duration;
    let mut gens = tokio::task::JoinSet::new();
    scenario::start(
        &mut gens,
        &cfg.scenarios,
        scenario::World {
            fleet: fleet.clone(),
            tracker: tracker.clone(),
            live: live.clone(),
            channels: Arc::new(channels),
        },
        &cfg.traffic,
        until,
    );
    let acked_before = Counters::get(&tracker.counters.acked);
    let traffic_started = Instant::now();
    let progress = async {
        while tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(500)).await;
            pb.set_position(traffic_started.elapsed().as_secs());
        }
    };
    let chaos = run_plan(
        &cfg.faults,
        &mut target,
        crate::chaos::World {
            fleet: &fleet,
            tracker: &tracker,
            live: &live,
            flood_rate: cfg.flood_rate,
            body_bytes: cfg.traffic.body_bytes,
            seed: cfg.traffic.seed,
            traffic_until: until,
        },
        traffic_started,
        until + cfg.drain,
    );
    let (faults, ()) = tokio::join!(chaos, progress);
    let traffic_secs = traffic_started.elapsed().as_secs_f64();
    let acked_in_traffic = Counters::get(&tracker.counters.acked) - acked_before;
    let _ = tokio::time::timeout(Duration::from_secs(35), async {
        while gens.join_next().await.is_some() {}
    })
    .await;
    let traffic_to = sampler.elapsed();

    // Drain: wait for what is in flight (bounded).
    sampler.set_phase("drain");
    let drain_until = Instant::now() + cfg.drain;
    while !tracker.settled() && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let open_at_end = fleet.open_now();
    let outstanding = tracker.outstanding();
    // Where each missed recipient stood at the end: the first thing to know about a loss.
    for (id, sender, missing) in &outstanding.acked_undelivered_missing {
        for user in missing {
            let slot = (0..fleet.len()).find(|&i| fleet.user(i) == *user);
            let client = slot.and_then(|i| fleet.client(i));
            warn!(
                message_id = id,
                sender = sender.0,
                recipient = user.0,
                slot,
                server = client.as_ref().map(|c| c.server()),
                open = client
                    .as_ref()
                    .is_some_and(|c| c.conn().is_ok_and(|c| c.is_open())),
                gap_fills = client.as_ref().map(|c| c.gap_fills()),
                "acked message never reached this recipient"
            );
        }
    }
    sampler_task.abort();
    pb.finish_and_clear();
    fleet.close_all().await;
    target.stop();

    // Report.
    let timeline = sampler.samples.lock().clone();
    let c = &tracker.counters;
    let h = tracker.hist.lock();
    let nodes = target
        .nodes
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let addr = target.servers.get(i).cloned().unwrap_or_default();
            let conns = if target.nodes.len() == 1 {
                per_server.values().sum()
            } else {
                per_server.get(&addr).copied().unwrap_or(0)
            };
            let (cpu_traffic_pct, rss_max) =
                proc_figures(&timeline, &w.name, traffic_from, traffic_to);
            NodeFigures {
                name: w.name.clone(),
                pid: w.pid,
                rss_before: rss_before[i],
                rss_held: rss_held[i],
                rss_max,
                connections: conns,
                rss_per_connection: (conns > 0 && rss_held[i] > 0)
                    .then(|| (rss_held[i] as f64 - rss_before[i] as f64) / conns as f64),
                cpu_traffic_pct,
            }
        })
        .collect();
    let others = cfg
        .watch
        .iter()
        .map(|w| {
            let (cpu_traffic_pct, rss_max) =
                proc_figures(&timeline, &w.name, traffic_from, traffic_to);
            NodeFigures {
                name: w.name.clone(),
                pid: w.pid,
                rss_max,
                cpu_traffic_pct,
                ..NodeFigures::default()
            }
        })
        .collect();
    let mut report = Report {
        schema_version: crate::report::SCHEMA_VERSION,
        version: env!("CARGO_PKG_VERSION").into(),
        started_unix_ms,
        command: cfg.command.clone(),
        machine: Machine::this(),
        scenarios: cfg
            .scenarios
            .iter()
            .map(|s| format!("{s:?}").to_lowercase())
            .collect(),
        settings: cfg.settings.clone(),
        spawned_nodes: target.is_spawned(),
        connections: Connections {
            requested: cfg.connections,
            established,
            failed: Counters::get(&c.connect_failed),
            ramp_secs,
            connects_per_sec: established as f64 / ramp_secs.max(1e-9),
            open_at_end,
            max_open: timeline
                .iter()
                .map(|s| s.connections_open)
                .max()
                .unwrap_or(0),
            held_secs: traffic_secs,
            unplanned_disconnects: Counters::get(&c.unplanned_disconnects),
            redirects_followed: Counters::get(&c.redirects),
            silences: Counters::get(&c.silences),
            early_rehomes: Counters::get(&c.early_rehomes),
            handshake: Latency::of(&h.handshake),
            per_node: per_server,
        },
        reconnects: Reconnects {
            ok: Counters::get(&c.reconnects_ok),
            failed: Counters::get(&c.reconnects_failed),
            latency: Latency::of(&h.reconnect),
        },
        messages: Messages {
            sent: Counters::get(&c.sent),
            acked: Counters::get(&c.acked),
            send_failed: Counters::get(&c.send_failed),
            delivered: Counters::get(&c.delivered),
            acked_undelivered: outstanding.acked_undelivered,
            acked_undelivered_ids: outstanding.acked_undelivered_ids.clone(),
            unresolved_sends: outstanding.unresolved_sends,
            duplicates: Counters::get(&c.duplicates),
            own_echoes: Counters::get(&c.own_echoes),
            id_mismatches: Counters::get(&c.id_mismatches),
            unexpected: Counters::get(&c.unexpected),
            generator_skipped: Counters::get(&c.generator_skipped),
            gaps: Counters::get(&c.gaps),
            acked_per_sec: acked_in_traffic as f64 / traffic_secs.max(1e-9),
            ack_latency: Latency::of(&h.ack),
            e2e_latency: Latency::of(&h.e2e),
            delivery_latency: Latency::of(&h.delivery),
        },
        faults,
        flood: Flood {
            sent: Counters::get(&c.flood_sent),
            acked: Counters::get(&c.flood_acked),
            rate_limited: Counters::get(&c.flood_rate_limited),
            failed: Counters::get(&c.flood_failed),
            skipped: Counters::get(&c.flood_skipped),
        },
        rehome: Rehome {
            victims: Counters::get(&c.rehome_victims),
            rehomed: Counters::get(&c.rehomed),
            latency: Latency::of(&h.rehome),
        },
        nodes,
        others,
        errors: fleet.errors(),
        passed: false,
        failures: Vec::new(),
        timeline,
    };
    drop(h);
    report.judge(&outstanding);
    report.write(&cfg.out)?;
    Ok(report)
}

/// Mean CPU of process `name` over the traffic phase (samples after `from` up to `to`, percent
/// of one core) and its highest RSS sampled.
fn proc_figures(timeline: &[crate::sampler::Sample], name: &str, from: f64, to: f64) -> (f64, u64) {
    let mine = |s: &crate::sampler::Sample| {
        s.procs
            .iter()
            .filter(|p| p.name == name)
            .cloned()
            .collect::<Vec<_>>()
    };
    let rss_max = timeline
        .iter()
        .flat_map(mine)
        .map(|p| p.rss_bytes)
        .max()
        .unwrap_or(0);
    let in_traffic: Vec<f64> = timeline
        .iter()
        .filter(|s| s.t_secs > from && s.t_secs <= to)
        .flat_map(mine)
        .map(|p| p.cpu_pct)
        .collect();
    let cpu = if in_traffic.is_empty() {
        0.0
    } else {
        in_traffic.iter().sum::<f64>() / in_traffic.len() as f64
    };
    (cpu, rss_max)
}
