//! Snowflake generation rate: one thread, and two threads contending on one generator.
//! The format's ceiling is 4,096,000 ids/s per worker (4096 per millisecond); the generator
//! never runs ahead of the clock, so the best possible result is that ceiling.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use meshchat_idgen::Generator;

fn one_thread(c: &mut Criterion) {
    let mut g = c.benchmark_group("idgen");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(5));
    let generator = Generator::new(1).expect("generator");
    g.bench_function("next_id/1-thread", |b| {
        b.iter(|| generator.next_id().expect("id"))
    });
    g.finish();
}

fn two_threads(c: &mut Criterion) {
    let mut g = c.benchmark_group("idgen");
    g.throughput(Throughput::Elements(2));
    g.measurement_time(Duration::from_secs(5));
    let generator = Arc::new(Generator::new(2).expect("generator"));
    // Each iteration issues one id on each of two threads sharing one generator, so the
    // reported rate is ids/s across both threads.
    g.bench_function("next_id/2-threads-contending", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            let other = {
                let generator = generator.clone();
                std::thread::spawn(move || {
                    for _ in 0..iters {
                        generator.next_id().expect("id");
                    }
                })
            };
            for _ in 0..iters {
                generator.next_id().expect("id");
            }
            other.join().expect("thread");
            start.elapsed()
        })
    });
    g.finish();
}

criterion_group!(benches, one_thread, two_threads);
criterion_main!(benches);
