//! `meshchat-loadtest`: flags in, JSON report out.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use meshchat_client::ConnectOptions;
use meshchat_loadtest::idle::{IdleRun, run};

#[derive(Parser)]
#[command(version, about = "meshchat load harness")]
struct Cli {
    /// Node address.
    #[arg(long, default_value = "127.0.0.1:7400")]
    server: String,
    /// CA certificate of the cluster.
    #[arg(long)]
    ca: PathBuf,
    /// The cluster's token secret file (to mint tokens for synthetic users).
    #[arg(long)]
    token_secret: PathBuf,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Open N authenticated connections and hold them; report the node's RSS per connection.
    Idle {
        /// Connections.
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// Client UDP sockets to spread connections over.
        #[arg(long, default_value_t = 8)]
        endpoints: usize,
        /// Handshakes in flight at once.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// Seconds to hold the connections once open.
        #[arg(long, default_value_t = 10)]
        hold_secs: u64,
        /// The node's pid, to sample its RSS.
        #[arg(long)]
        node_pid: Option<u32>,
        /// First synthetic user id.
        #[arg(long, default_value_t = 1_000_000_000)]
        first_user: u64,
    },
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
    let roots = meshchat_client::load_ca(&cli.ca)?;
    let secret = std::fs::read(&cli.token_secret)
        .with_context(|| format!("reading {}", cli.token_secret.display()))?;
    let secret = secret.trim_ascii().to_vec();
    match cli.scenario {
        Scenario::Idle {
            connections,
            endpoints,
            concurrency,
            hold_secs,
            node_pid,
            first_user,
        } => {
            let mut options = ConnectOptions::new(roots);
            options.event_buffer = 16;
            let report = run(IdleRun {
                server: cli.server,
                options,
                secret,
                connections,
                endpoints,
                concurrency,
                hold: Duration::from_secs(hold_secs),
                node_pid,
                first_user,
            })
            .await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
    }
    Ok(())
}
