//! The embedded store's write path.
//!
//! - `storage/durable_append`: durable writes/s with 1, 16 and 256 concurrent writers. Group
//!   commit (the default, up to 512 writes per fsync) side by side with the baseline of one
//!   transaction and one fsync per write (`max_batch = 1`), in the same run. A write returns
//!   only after it is durable.
//! - `storage/writer_cpu_per_append`: CPU time of the store's own threads (writer, syncer
//!   and checkpointer, read from `/proc/self/task/*/schedstat`) per durable append, 16 writers; criterion's
//!   "time" is that CPU time per append, not wall time. `same_chats`: each writer appends to
//!   one chat of its own (appends share pages); `spread_chats`: every append goes to another
//!   of 100,000 chats, as a node's 1:1 traffic does (each append touches pages of its own).
//!   Each with the WAL writes gathered (`gather`, the default) and as SQLite makes them
//!   (`no_gather`, the baseline), in the same run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use meshchat_idgen::{ChatId, Generator, MessageId, UserId};
use meshchat_storage::{EmbeddedConfig, EmbeddedStore, HistoryStore, NewMessage};

fn store(dir: &std::path::Path, max_batch: usize, gather: bool) -> Arc<EmbeddedStore> {
    let mut config = EmbeddedConfig::in_dir(dir);
    config.max_batch = max_batch;
    config.gather_wal_writes = gather;
    Arc::new(EmbeddedStore::open(config).expect("open store"))
}

/// Appends `total` messages from `writers` concurrent tasks, each to a chat of its own or
/// (`spread`) each to another of 100,000 chats; returns the elapsed time.
async fn run(
    store: &Arc<EmbeddedStore>,
    ids: &Arc<Generator>,
    writers: u64,
    total: u64,
    spread: bool,
) -> Duration {
    let start = Instant::now();
    let per = total.div_ceil(writers);
    let mut tasks = Vec::with_capacity(writers as usize);
    for w in 0..writers {
        let (store, ids) = (store.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            let sender = UserId(10 + w);
            for i in 0..per {
                let id = MessageId(ids.next_id().expect("id").0);
                let peer = if spread {
                    1_000 + (w * per + i) * 7_919 % 100_000
                } else {
                    1
                };
                let chat = ChatId::direct(sender, UserId(peer));
                store
                    .append(NewMessage {
                        id,
                        chat,
                        sender,
                        client_msg_id: id.to_string(),
                        body: Bytes::from_static(&[b'x'; 200]),
                        reply_to: None,
                    })
                    .await
                    .expect("append");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    start.elapsed()
}

fn durable_writes(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let ids = Arc::new(Generator::new(5).expect("generator"));
    let mut g = c.benchmark_group("storage/durable_append");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(8));
    for writers in [1u64, 16, 256] {
        for (label, max_batch) in [("group_commit", 512usize), ("no_grouping", 1)] {
            let dir = tempfile::tempdir().expect("temp dir");
            let s = store(dir.path(), max_batch, true);
            // Writes per iteration: enough for every writer to have several in flight.
            let batch = (writers * 4).max(64);
            g.throughput(Throughput::Elements(batch));
            g.bench_with_input(
                BenchmarkId::new(label, format!("{writers}_writers")),
                &writers,
                |b, &writers| {
                    b.iter_custom(|iters| {
                        rt.block_on(async {
                            let mut total = Duration::ZERO;
                            for _ in 0..iters {
                                total += run(&s, &ids, writers, batch, false).await;
                            }
                            total
                        })
                    })
                },
            );
        }
    }
    g.finish();
}

/// Nanoseconds of CPU the store's threads (`mc-store-*`, or `meshchat-store-*` before the rework) have used so far.
fn store_threads_cpu() -> Duration {
    let mut total = 0u64;
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        // The writer, syncer and checkpointer threads: `mc-store-*` (names before the syncer
        // existed were `meshchat-store-*`, cut by the kernel to "meshchat-store-").
        if !comm.starts_with("mc-store-") && !comm.starts_with("meshchat-store-") {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        total += stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Duration::from_nanos(total)
}

fn writer_cpu(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let ids = Arc::new(Generator::new(6).expect("generator"));
    let mut g = c.benchmark_group("storage/writer_cpu_per_append");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(8));
    for (chats, spread) in [("same_chats", false), ("spread_chats", true)] {
        for (label, gather) in [("gather", true), ("no_gather", false)] {
            let dir = tempfile::tempdir().expect("temp dir");
            let s = store(dir.path(), 512, gather);
            g.bench_function(
                BenchmarkId::new(format!("16_writers_{chats}"), label),
                |b| {
                    b.iter_custom(|iters| {
                        rt.block_on(async {
                            let before = store_threads_cpu();
                            // `run` rounds up to whole writers: count what it really appended.
                            let appended = iters.max(16).div_ceil(16) * 16;
                            run(&s, &ids, 16, appended, spread).await;
                            let cpu = store_threads_cpu().saturating_sub(before);
                            // Criterion divides by `iters`: scale to the appends made.
                            cpu.mul_f64(iters as f64 / appended as f64)
                        })
                    })
                },
            );
        }
    }
    g.finish();
}

criterion_group!(benches, durable_writes, writer_cpu);
criterion_main!(benches);
