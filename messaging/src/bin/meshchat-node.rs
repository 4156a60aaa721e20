//! `meshchat-node`: parse flags, start tracing, hand config to the library. Nothing else.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use meshchat_messaging::NodeConfig;
use meshchat_messaging::config::CassandraSettings;
use meshchat_messaging::dev::{DevCluster, DevStorage, Running, stop_children};
use std::time::Duration;

#[derive(Parser)]
#[command(version, about = "meshchat messaging node")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one node from a config file (+ MESHCHAT_* environment variables).
    Run {
        /// TOML config file (see deploy/node.example.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override `listen`.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Override `data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Override `node_id`.
        #[arg(long)]
        node_id: Option<u32>,
    },
    /// Validate a config file (and the environment) without starting: exits non-zero naming
    /// the key and the problem, else prints what the node would run with and any warnings.
    CheckConfig {
        /// TOML config file.
        config: PathBuf,
    },
    /// Create a cluster's certificates in DIR: a client-facing CA and one for the mesh (each
    /// made once, then reused), and per node a client-facing certificate for its names and
    /// a mesh certificate for `node-<id>`. Existing leaves are kept unless --renew.
    Certs {
        /// Output directory (keys are written owner-only).
        #[arg(long)]
        out: PathBuf,
        /// A node: ID=NAME[,NAME...] (the names clients dial it by; DNS names or IPs).
        /// Repeatable.
        #[arg(long = "node", required = true)]
        nodes: Vec<meshchat_messaging::certs::NodeCerts>,
        /// Validity of the node certificates, in days.
        #[arg(long, default_value_t = 397)]
        days: u32,
        /// Issue every listed node's certificates again (rotation; same CAs).
        #[arg(long)]
        renew: bool,
    },
    /// Show a running node's view: readiness, ring, peer links, connections, lease.
    Status {
        /// The node's admin listener (`[admin] listen`).
        #[arg(long, default_value = "127.0.0.1:9400")]
        admin: std::net::SocketAddr,
    },
    /// Drain a running node (Redis membership or a static cluster): off the ring, its users redirected to their
    /// next homes; the node stops once they moved (or after `cluster.drain_timeout`).
    Drain {
        /// The node's admin listener (`[admin] listen`).
        #[arg(long, default_value = "127.0.0.1:9400")]
        admin: std::net::SocketAddr,
        /// Wait until the node has stopped (its admin listener closed).
        #[arg(long)]
        wait: bool,
    },
    /// Create or upgrade the Cassandra/ScyllaDB schema (`[storage.cassandra]` of the config).
    Migrate {
        /// TOML config file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print the statements that would run, run nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// A local cluster on loopback (embedded store, or a Cassandra server), for development.
    Dev {
        /// Nodes to run.
        #[arg(long, default_value_t = 1)]
        nodes: u32,
        /// Shared data directory (store, dev CA, token secret).
        #[arg(long, default_value = "./meshchat-dev")]
        data_dir: PathBuf,
        /// Node i listens on 127.0.0.1:(base-port + i).
        #[arg(long, default_value_t = 7400)]
        base_port: u16,
        /// Redis URL for dynamic membership (default: a static member list).
        #[arg(long)]
        redis: Option<String>,
        /// Where state and history live: `embedded` (a store in the data dir) or `cassandra`
        /// (the server at --cql; the keyspace is migrated before the nodes start).
        #[arg(long, value_enum, default_value_t = DevBackend::Embedded)]
        storage: DevBackend,
        /// Cassandra contact points, `host:port` (comma-separated), with --storage cassandra.
        #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:9042")]
        cql: Vec<String>,
        /// Cassandra keyspace, with --storage cassandra (one replica in `datacenter1`).
        #[arg(long, default_value = "meshchat")]
        keyspace: String,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum DevBackend {
    Embedded,
    Cassandra,
}

/// SIGINT or SIGTERM. The handlers are installed when this is called, not when the returned
/// future is first polled: a signal that arrives while the node is still starting (or right
/// after `dev` printed its banner) must stop it gracefully, not kill it.
/// With `hangup`, SIGHUP stops too (`dev`: a closed terminal must stop its child nodes, which
/// take SIGHUP as "reload the log level" and would be left running).
fn shutdown_signal(hangup: bool) -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut hup = if hangup {
        Some(signal(SignalKind::hangup()).context("SIGHUP handler")?)
    } else {
        None
    };
    Ok(async move {
        let hup = async {
            match hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            () = hup => {}
        }
    })
}

/// The `run` command's overrides of the config file, applied at start and on every reload.
struct Overrides {
    listen: Option<std::net::SocketAddr>,
    data_dir: Option<PathBuf>,
    node_id: Option<u32>,
}

impl Overrides {
    fn apply(&self, c: &mut NodeConfig) {
        if let Some(l) = self.listen {
            c.listen = l;
        }
        if let Some(d) = &self.data_dir {
            c.data_dir = d.clone();
        }
        if let Some(n) = self.node_id {
            c.node_id = n;
        }
    }
}

/// Runs a node until `stop` (SIGINT, SIGTERM) or the end of a drain. On SIGHUP the config
/// file is read again and what can change without a restart is applied (certificates,
/// limits, log level: `meshchat_messaging::reload`).
async fn run_node(
    config: NodeConfig,
    file: Option<PathBuf>,
    overrides: Overrides,
    log: meshchat_messaging::logging::LogHandle,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let running = meshchat_messaging::start(config).await?;
    let mut drained = running.drained();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => {
                tracing::info!("shutting down");
                break;
            }
            _ = drained.wait_for(|d| *d) => {
                tracing::info!("drained: shutting down");
                break;
            }
            Some(()) = hup.recv() => {
                let reloaded = NodeConfig::load(file.as_deref())
                    .map_err(anyhow::Error::from)
                    .and_then(|mut c| {
                        overrides.apply(&mut c);
                        Ok(running.reload(&c, Some(&log))?)
                    });
                match reloaded {
                    Ok(r) if r.needs_restart.is_empty() => {
                        tracing::info!(applied = ?r.applied, "SIGHUP: configuration reloaded");
                    }
                    Ok(r) => tracing::warn!(
                        applied = ?r.applied,
                        needs_restart = ?r.needs_restart,
                        "SIGHUP: configuration reloaded; some changed keys take effect only after a restart"
                    ),
                    Err(e) => tracing::warn!(
                        error = format!("{e:#}"),
                        "SIGHUP: configuration not reloaded; the node runs as before"
                    ),
                }
            }
        }
    }
    running.shutdown().await;
    // The spans of the shutdown itself included.
    let _ = tokio::task::spawn_blocking(move || log.shutdown()).await;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // `run` logs as its config says; every other command in text at `info` (or RUST_LOG).
    let run_config = match &cli.cmd {
        Cmd::Run {
            config, node_id, ..
        } => {
            let mut c = NodeConfig::load(config.as_deref()).context("loading config")?;
            c.node_id = node_id.unwrap_or(c.node_id);
            Some(c)
        }
        _ => None,
    };
    // `runtime.worker_threads` (0: tokio's choice, `TOKIO_WORKER_THREADS` or one per core).
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(n) = run_config
        .as_ref()
        .map(|c| c.runtime.worker_threads)
        // (`NodeConfig::load` has refused a value past 1024.)
        .filter(|n| *n > 0)
    {
        runtime.worker_threads(n);
    }
    runtime
        .build()
        .context("starting the async runtime")?
        .block_on(serve(cli, run_config))
}

async fn serve(cli: Cli, run_config: Option<NodeConfig>) -> anyhow::Result<()> {
    let log = {
        let l = run_config
            .as_ref()
            .map(|c| c.log.clone())
            .unwrap_or_default();
        let node_id = run_config.as_ref().map_or(1, |c| c.node_id);
        meshchat_messaging::logging::init(&l, node_id)?
    };
    let stop = shutdown_signal(matches!(cli.cmd, Cmd::Dev { .. }))?;
    match cli.cmd {
        Cmd::Run {
            config,
            listen,
            data_dir,
            node_id,
        } => {
            let mut c = run_config.context("config loaded above")?;
            let overrides = Overrides {
                listen,
                data_dir,
                node_id,
            };
            overrides.apply(&mut c);
            let flush = log.clone();
            let ran = run_node(c, config, overrides, log, stop).await;
            if ran.is_err() {
                // The spans of a failed start, exported too.
                let _ = tokio::task::spawn_blocking(move || flush.shutdown()).await;
            }
            ran?;
        }
        Cmd::Certs {
            out,
            nodes,
            days,
            renew,
        } => {
            anyhow::ensure!((1..=3650).contains(&days), "--days must be 1..=3650");
            let written = meshchat_messaging::certs::make(&out, &nodes, days, renew)?;
            use std::io::Write;
            let mut o = std::io::stdout().lock();
            for f in &written {
                writeln!(o, "wrote {}", f.display())?;
            }
            if written.is_empty() {
                writeln!(
                    o,
                    "nothing to do: every certificate exists (--renew issues them again)"
                )?;
            }
        }
        Cmd::Status { admin } => {
            let (ready, report) = meshchat_messaging::admin::status(admin)
                .await
                .with_context(|| format!("admin listener {admin}"))?;
            use std::io::Write;
            std::io::stdout().write_all(report.as_bytes())?;
            // Scriptable: non-zero while the node is not ready.
            anyhow::ensure!(ready, "not ready");
        }
        Cmd::Drain { admin, wait } => {
            let (status, body) = meshchat_messaging::admin::call(admin, "POST", "/drain")
                .await
                .with_context(|| format!("admin listener {admin}"))?;
            use std::io::Write;
            std::io::stdout().write_all(body.as_bytes())?;
            if status != 202 {
                anyhow::bail!("drain refused ({status})");
            }
            if wait {
                // Until the listener closes (it stops just before the node does), or answers
                // for another process (a node restarted on the same port meanwhile).
                let pid_of = |body: &str| {
                    serde_json::from_str::<serde_json::Value>(body)
                        .ok()
                        .and_then(|v| v["pid"].as_u64())
                };
                let draining = meshchat_messaging::admin::call(admin, "GET", "/cluster")
                    .await
                    .ok()
                    .and_then(|(_, b)| pid_of(&b));
                // A drain is bounded by cluster.drain_timeout (at most a day) plus the grace.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(25 * 3600);
                loop {
                    match meshchat_messaging::admin::call(admin, "GET", "/cluster").await {
                        Ok((_, b)) if pid_of(&b) == draining => {}
                        Ok(_) => break,
                        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                        Err(_) => break, // refused: the listener is closed
                    }
                    anyhow::ensure!(
                        tokio::time::Instant::now() < deadline,
                        "the node did not stop"
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                std::io::stdout().write_all(b"stopped\n")?;
            }
        }
        Cmd::CheckConfig { config } => {
            let c =
                NodeConfig::load(Some(&config)).with_context(|| format!("{}", config.display()))?;
            let warnings = c
                .check_files()
                .with_context(|| format!("{}", config.display()))?;
            let clustered = !c.cluster.members.is_empty() || c.cluster.redis.is_some();
            let mut out = format!(
                "{}: ok\n  node {} (worker id {}), clients on {} (advertised {})\n  \
                 storage: {:?}, data dir {}\n  cluster: {}\n  admin: {}\n",
                config.display(),
                c.node_id,
                c.worker_id(),
                c.listen,
                c.advertise.as_deref().unwrap_or("the bound address"),
                c.storage.backend,
                c.data_dir.display(),
                match (&c.cluster.redis, clustered) {
                    (Some(r), _) => format!(
                        "Redis membership at {}",
                        meshchat_messaging::config::redact_url(r)
                    ),
                    (None, true) => format!("{} static members", c.cluster.members.len()),
                    (None, false) => "none (a node alone)".into(),
                },
                c.admin
                    .listen
                    .map_or("off".to_string(), |a| format!("http://{a}/")),
            );
            for w in &warnings {
                out.push_str(&format!("  warning: {w}\n"));
            }
            use std::io::Write;
            std::io::stdout().write_all(out.as_bytes())?;
        }
        Cmd::Migrate { config, dry_run } => {
            let c = NodeConfig::load(config.as_deref()).context("loading config")?;
            let cfg = c.storage.cassandra.to_config()?;
            let statements = if dry_run {
                // Without a cluster: the full schema this build would create.
                meshchat_storage::cassandra::schema_statements(&cfg)
            } else {
                let session = meshchat_storage::cassandra::connect_session(&cfg).await?;
                meshchat_storage::cassandra::migrate(&session, &cfg, false).await?
            };
            #[allow(clippy::print_stdout)]
            for s in &statements {
                println!("{s};");
            }
            tracing::info!(count = statements.len(), dry_run, "schema statements");
        }
        Cmd::Dev {
            nodes,
            data_dir,
            base_port,
            redis,
            storage,
            cql,
            keyspace,
        } => {
            let storage = match storage {
                DevBackend::Embedded => DevStorage::Embedded,
                DevBackend::Cassandra => DevStorage::Cassandra(CassandraSettings {
                    nodes: cql,
                    keyspace,
                    ..CassandraSettings::default()
                }),
            };
            let mut dev = DevCluster::new(
                nodes,
                std::path::absolute(&data_dir).unwrap_or(data_dir),
                base_port,
                redis,
                storage,
            );
            // Admin listeners (/healthz, /readyz, /metrics, /cluster) on TCP base_port + 200 + i.
            dev.admin_base = base_port.checked_add(200);
            let exe = std::env::current_exe().context("locating meshchat-node")?;
            #[allow(clippy::print_stderr)]
            let running = dev.start(&exe, |line| eprintln!("{line}")).await?;
            let client = exe
                .parent()
                .map(|d| d.join("meshchat"))
                .filter(|p| p.exists())
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "meshchat".into());
            {
                // Not println!: a reader that closed our stdout must not take the cluster down.
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{}", dev.banner(&client));
                let _ = out.flush();
            }
            stop.await;
            match running {
                Running::InProcess(node) => node.shutdown().await,
                Running::Children(mut children) => {
                    tokio::task::spawn_blocking(move || {
                        stop_children(&mut children, Duration::from_secs(15))
                    })
                    .await?;
                }
            }
        }
    }
    Ok(())
}
