//! Ring lookup and rebuild at 8, 64 and 256 members, side by side with rendezvous hashing.
//! Goal: lookup <= 100 ns at 64 members.

use std::collections::BTreeMap;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use meshchat_backplane::ring::{DEFAULT_VNODES_PER_WEIGHT, Rendezvous, Ring};
use meshchat_idgen::{NodeId, UserId};

fn members(n: u32) -> BTreeMap<NodeId, u32> {
    (1..=n).map(|i| (NodeId(i), 1)).collect()
}

fn lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring/lookup");
    g.throughput(Throughput::Elements(1024));
    // 1024 different users per iteration so the bench sees cache misses a real node sees.
    let users: Vec<UserId> = (0..1024u64)
        .map(|u| UserId(u * 2_654_435_761 + 17))
        .collect();
    for n in [8u32, 64, 256] {
        let m = members(n);
        let ring = Ring::build(&m, DEFAULT_VNODES_PER_WEIGHT).expect("ring");
        g.bench_with_input(BenchmarkId::new("vnode_ring", n), &ring, |b, ring| {
            b.iter(|| {
                let mut x = 0u32;
                for u in &users {
                    x ^= ring.owner(*u).map(|n| n.0).unwrap_or(0);
                }
                x
            })
        });
        let rdv = Rendezvous::new(&m);
        g.bench_with_input(BenchmarkId::new("rendezvous", n), &rdv, |b, rdv| {
            b.iter(|| {
                let mut x = 0u32;
                for u in &users {
                    x ^= rdv.owner(*u).map(|n| n.0).unwrap_or(0);
                }
                x
            })
        });
    }
    g.finish();
}

fn rebuild(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring/rebuild");
    g.sample_size(10);
    for n in [8u32, 64, 256] {
        let m = members(n);
        g.bench_with_input(BenchmarkId::new("vnode_ring", n), &m, |b, m| {
            b.iter(|| Ring::build(m, DEFAULT_VNODES_PER_WEIGHT).expect("ring"))
        });
    }
    g.finish();
}

criterion_group!(benches, lookup, rebuild);
criterion_main!(benches);
