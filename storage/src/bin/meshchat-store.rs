//! `meshchat-store`: a small tool over an embedded store directory.
//!
//! - `write-load`: appends messages from many concurrent writers and prints one line per
//!   acked (durable) message, `acked <chat> <id>`, flushed as soon as the ack arrives. The
//!   multi-process and crash tests run it as a child process and SIGKILL it mid-batch.
//! - `check`: reads back every message id given on stdin (`acked <chat> <id>` lines) and
//!   exits non-zero if any is missing.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use meshchat_idgen::{ChatId, Generator, MessageId, UserId};
use meshchat_storage::{EmbeddedStore, HistoryStore, NewMessage};

#[derive(Parser)]
#[command(about = "Tools over a meshchat embedded store directory")]
struct Cli {
    /// The store directory (holds meshchat.db).
    #[arg(long)]
    dir: PathBuf,
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
    },
    /// Verify that every `acked <chat> <id>` line on stdin is stored.
    Check,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let store = Arc::new(EmbeddedStore::open_dir(&cli.dir).context("open store")?);
    match cli.cmd {
        Cmd::WriteLoad {
            worker,
            writers,
            per_writer,
        } => write_load(store, worker, writers, per_writer).await,
        Cmd::Check => check(store).await,
    }
}

async fn write_load(
    store: Arc<EmbeddedStore>,
    worker: u16,
    writers: u32,
    per_writer: u32,
) -> anyhow::Result<()> {
    let ids = Arc::new(Generator::new(worker).context("worker id")?);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(ChatId, MessageId)>(1024);
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
                let out = store.append(msg).await.expect("append");
                if tx.send((chat, out.id)).await.is_err() {
                    return;
                }
            }
        });
    }
    drop(tx);
    let stdout = std::io::stdout();
    while let Some((chat, id)) = rx.recv().await {
        let mut out = stdout.lock();
        writeln!(out, "acked {chat} {id}")?;
        out.flush()?;
    }
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
