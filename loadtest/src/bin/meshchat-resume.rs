//! `meshchat-resume`: time to the first reply on a fresh connection (full handshake) and on a
//! resumed one (0-RTT), through a relay that adds a fixed delay each way, so the round trips
//! show on one machine. Each round: a new client endpoint (no ticket) connects and sends the
//! hello and `Authenticate` together, the time to both replies is taken; it closes, then the
//! same endpoint (now holding the node's ticket) does the same again. Prints the medians and
//! spreads, and how many resumes the node took in 0-RTT.
//!
//! Without `--server` it starts a node in this process (embedded store in a temp dir).
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use meshchat_client::conn::{Conn, client_endpoint};
use meshchat_client::{Client, ConnectOptions, ZeroRtt};
use meshchat_proto::client::{self as pb, client_frame, server_frame};

#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    /// A running node (`host:port`); default: one started here.
    #[arg(long, requires = "ca")]
    server: Option<String>,
    /// The node's CA certificate (with --server).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Delay added in each direction, in milliseconds (a round trip gains twice this).
    #[arg(long, default_value_t = 25)]
    one_way_ms: u64,
    /// Rounds (each: one fresh connection, one resumed).
    #[arg(long, default_value_t = 30)]
    rounds: usize,
}

/// Sends the hello and the authentication together; the time until both are answered.
async fn first_replies(
    endpoint: &quinn::Endpoint,
    server: &str,
    opts: &ConnectOptions,
    token: &str,
) -> anyhow::Result<(Duration, ZeroRtt)> {
    let started = Instant::now();
    let (events, _rx) = tokio::sync::mpsc::channel(16);
    let conn = Conn::open(endpoint, server, opts, events).await?;
    let hello = client_frame::Body::Hello(pb::Hello {
        protocol_version: meshchat_proto::PROTOCOL_VERSION,
        ..Default::default()
    });
    let auth = client_frame::Body::Authenticate(pb::Authenticate {
        token: token.to_owned(),
    });
    let (h, a) = tokio::join!(biased; conn.request(hello), conn.request(auth));
    let took = started.elapsed();
    match (h?, a?) {
        (server_frame::Body::HelloOk(_), server_frame::Body::AuthOk(_)) => {}
        other => bail!("unexpected replies: {other:?}"),
    }
    conn.handshake_complete().await;
    let state = conn.zero_rtt();
    conn.close();
    Ok((took, state))
}

fn summary(name: &str, mut v: Vec<Duration>) -> String {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    format!(
        "{name:<9} n={:<3} min {:>6.1} ms  median {:>6.1} ms  p90 {:>6.1} ms  max {:>6.1} ms",
        v.len(),
        ms(v[0]),
        ms(at(0.5)),
        ms(at(0.9)),
        ms(v[v.len() - 1])
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cli.rounds == 0 || cli.rounds > 10_000 {
        bail!("--rounds: 1 to 10,000");
    }
    let dir = tempfile::tempdir()?;
    let mut node = None;
    let (server, ca) = match (&cli.server, &cli.ca) {
        (Some(s), Some(ca)) => (s.clone(), ca.clone()),
        _ => {
            let config = meshchat_messaging::NodeConfig {
                listen: "127.0.0.1:0".parse()?,
                data_dir: dir.path().to_owned(),
                ..Default::default()
            };
            let running = meshchat_messaging::start(config)
                .await
                .context("starting a node")?;
            let addr = running.addr.to_string();
            node = Some(running);
            (addr, dir.path().join("ca.pem"))
        }
    };
    let node_addr = meshchat_client::conn::resolve(&server)?.0;
    let relay = meshchat_loadtest::delay::start(
        "127.0.0.1:0".parse()?,
        node_addr,
        Duration::from_millis(cli.one_way_ms),
    )
    .await?;
    let via = relay.addr.to_string();
    let opts = ConnectOptions::new(meshchat_client::load_ca(&ca)?);

    // One user (one password hash), whose token every round presents.
    let (c, _) = Client::connect(&server, opts.clone()).await?;
    let name = format!(
        "resume{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
    );
    let session = c.register(&name, "resume-password-1").await?;
    c.close();
    let token = session.token;

    println!(
        "node {server} through a relay adding {} ms each way ({} ms round trip); {} rounds",
        cli.one_way_ms,
        2 * cli.one_way_ms,
        cli.rounds
    );
    let (mut full, mut resumed) = (Vec::new(), Vec::new());
    let mut accepted = 0;
    for _ in 0..cli.rounds {
        let endpoint = client_endpoint(&opts, "127.0.0.1:0".parse()?)?;
        let (t, state) = first_replies(&endpoint, &via, &opts, &token).await?;
        if state != ZeroRtt::NotTried {
            bail!("a fresh endpoint tried 0-RTT ({state:?})");
        }
        full.push(t);
        let (t, state) = first_replies(&endpoint, &via, &opts, &token).await?;
        if state == ZeroRtt::Accepted {
            accepted += 1;
        }
        resumed.push(t);
        endpoint.close(0u32.into(), b"done");
    }
    println!("{}", summary("full", full));
    println!("{}", summary("0-RTT", resumed));
    println!("resumes taken in 0-RTT: {accepted} of {}", cli.rounds);
    if let Some(n) = &node {
        let (held, bytes) = n.tickets();
        println!(
            "node's ticket store: {held} tickets, {bytes} bytes ({} bytes each)",
            bytes.checked_div(held).unwrap_or(0)
        );
    }
    drop(relay);
    if let Some(n) = node {
        n.shutdown().await;
    }
    Ok(())
}
