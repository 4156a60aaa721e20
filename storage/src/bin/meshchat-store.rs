//! `meshchat-store`: a small tool over an embedded store directory.
//!
//! - `write-load`: appends messages from many concurrent writers and prints one line per
//!   acked (durable) message, `acked <chat> <id>`, flushed as soon as the ack arrives. The
//!   multi-process and crash tests run it as a child process and SIGKILL it mid-batch.
//!   With `--stamp` each line ends with the ack's wall-clock time in microseconds since the
//!   Unix epoch (the crash test measures how long a killed process stalls the others); at the
//!   end it prints the append latency percentiles and the rate to stderr.
//! - `check`: reads back every message id given on stdin (`acked <chat> <id>` lines) and
//!   exits non-zero if any is missing.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use meshchat_idgen::{ChatId, Generator, MessageId, UserId};
use meshchat_storage::{CrossProcess, EmbeddedConfig, EmbeddedStore, HistoryStore, NewMessage};

#[derive(Parser)]
#[command(about = "Tools over a meshchat embedded store directory")]
struct Cli {
    /// The store directory (holds meshchat.db).
    #[arg(long)]
    dir: PathBuf,
    /// How writers of several processes share the store: turn-lock (the default),
    /// sqlite-busy (SQLite's busy handler) or busy-poll.
    #[arg(long, default_value = "turn-lock")]
    cross_process: CrossProcess,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Append messages from concurrent writers; print each ack as it arrives.
    WriteLoad {
        /// Snowflake worker id (distinct per process).
        #[arg(long)]
        worker: u16,
        /// Concurrent writers.
        #[arg(long, default_value_t = 16)]
        writers: u32,
        /// Messages per writer.
        #[arg(long, default_value_t = 100)]
        per_writer: u32,
        /// End each `acked` line with the ack's time (µs since the Unix epoch).
        #[arg(long)]
        stamp: bool,
    },
    /// Verify that every `acked <chat> <id>` line on stdin is stored.
    Check,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Logs to stderr, off unless RUST_LOG asks (e.g. RUST_LOG=meshchat_storage=debug).
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let mut config = EmbeddedConfig::in_dir(&cli.dir);
    config.cross_process = cli.cross_process;
    let store = Arc::new(EmbeddedStore::open(config).context("open store")?);
    match cli.cmd {
        Cmd::WriteLoad {
            worker,
            writers,
            per_writer,
            stamp,
        } => write_load(store, worker, writers, per_writer, stamp).await,
        Cmd::Check => check(store).await,
    }
}

async fn write_load(
    store: Arc<EmbeddedStore>,
    worker: u16,
    writers: u32,
    per_writer: u32,
    stamp: bool,
) -> anyhow::Result<()> {
    let ids = Arc::new(Generator::new(worker).context("worker id")?);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(ChatId, MessageId, Duration)>(1024);
    let started = Instant::now();
    for w in 0..writers {
        let (store, ids, tx) = (store.clone(), ids.clone(), tx.clone());
        tokio::spawn(async move {
            let sender = UserId(1_000 + u64::from(worker) * 10_000 + u64::from(w));
            let chat = ChatId::direct(sender, UserId(1));
            for n in 0..per_writer {
                let id = MessageId(ids.next_id().expect("clock in range").0);
                let msg = NewMessage {
                    id,
                    chat,
                    sender,
                    client_msg_id: format!("w{worker}-{w}-{n}"),
                    body: Bytes::from(format!("worker {worker} writer {w} message {n}")),
                    reply_to: None,
                };
                let sent = Instant::now();
                let out = store.append(msg).await.expect("append");
                if tx.send((chat, out.id, sent.elapsed())).await.is_err() {
                    return;
                }
            }
        });
    }
    drop(tx);
    let stdout = std::io::stdout();
    let mut latencies = Vec::with_capacity((writers * per_writer) as usize);
    while let Some((chat, id, latency)) = rx.recv().await {
        latencies.push(latency);
        let mut out = stdout.lock();
        if stamp {
            let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_micros();
            writeln!(out, "acked {chat} {id} {now}")?;
        } else {
            writeln!(out, "acked {chat} {id}")?;
        }
        out.flush()?;
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    writeln!(
        std::io::stderr().lock(),
        "worker {worker}: {} appends in {:.2} s = {:.0}/s; latency ms p50 {:.2} p99 {:.2} p99.9 {:.2} max {:.2}",
        latencies.len(),
        elapsed.as_secs_f64(),
        latencies.len() as f64 / elapsed.as_secs_f64(),
        at(0.5),
        at(0.99),
        at(0.999),
        at(1.0),
    )?;
    Ok(())
}

async fn check(store: Arc<EmbeddedStore>) -> anyhow::Result<()> {
    let mut missing = 0u64;
    let mut total = 0u64;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let mut parts = line.split_whitespace();
        let (Some("acked"), Some(chat), Some(id)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let chat: ChatId = chat.parse()?;
        let id = MessageId(id.parse()?);
        total += 1;
        if store.message(chat, id).await?.is_none() {
            missing += 1;
        }
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "checked {total}, missing {missing}")?;
    if missing > 0 {
        bail!("{missing} acked messages are missing");
    }
    Ok(())
}
