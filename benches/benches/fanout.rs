//! Channel fan-out planning ([`meshchat_backplane::fanout::plan`]) for 10 .. 100k recipients
//! over 3, 16 and 64 nodes, side by side with the `BTreeMap<NodeId, Vec<u64>>` grouping it
//! replaced (the baseline, kept here verbatim in shape).
//!
//! Every variant pays the same ring lookup per recipient (`Ring::owner` on a real ring built
//! with the default vnode count), so `ring_lookup_only` (the lookups and the online test,
//! no grouping) shows how much of each plan is grouping at all.
//!
//! Recipients are scattered ids (multiplicative hash), so owners arrive in random order as
//! they do for a real channel; 1 in 50 is "still online here" although owned elsewhere.

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use meshchat_backplane::fanout::{FanoutPlan, plan};
use meshchat_backplane::ring::{DEFAULT_VNODES_PER_WEIGHT, Ring};
use meshchat_idgen::{NodeId, UserId};

const ME: NodeId = NodeId(1);

/// The grouping `Mesh::deliver` did inline before `fanout::plan`.
fn btreemap_baseline(
    me: NodeId,
    recipients: &[UserId],
    owner: impl Fn(UserId) -> NodeId,
    online_here: impl Fn(UserId) -> bool,
) -> FanoutPlan {
    let mut local = Vec::new();
    let mut remote: BTreeMap<NodeId, Vec<u64>> = BTreeMap::new();
    for &u in recipients {
        let node = owner(u);
        if node == me || online_here(u) {
            local.push(u);
        }
        if node != me {
            remote.entry(node).or_default().push(u.0);
        }
    }
    FanoutPlan {
        local,
        remote: remote.into_iter().collect(),
    }
}

fn online_here(u: UserId) -> bool {
    u.0.is_multiple_of(50)
}

fn fanout(c: &mut Criterion) {
    let rings: Vec<(u32, Ring)> = [3u32, 16, 64]
        .into_iter()
        .map(|n| {
            let m: BTreeMap<NodeId, u32> = (1..=n).map(|i| (NodeId(i), 1)).collect();
            (n, Ring::build(&m, DEFAULT_VNODES_PER_WEIGHT).expect("ring"))
        })
        .collect();
    for members in [10usize, 100, 1_000, 10_000, 100_000] {
        let recipients: Vec<UserId> = (0..members as u64)
            .map(|u| UserId(u * 2_654_435_761 + 17))
            .collect();
        let mut g = c.benchmark_group(format!("fanout/{members}_members"));
        g.throughput(Throughput::Elements(members as u64));
        if members >= 10_000 {
            // Milliseconds per iteration: 10 samples keep the group within a few seconds.
            g.sample_size(10);
        }
        for (nodes, ring) in &rings {
            let owner = |u: UserId| ring.owner(u).unwrap_or(ME);
            // Both variants must plan the same thing, or the comparison means nothing.
            assert_eq!(
                plan(ME, &recipients, owner, online_here),
                btreemap_baseline(ME, &recipients, owner, online_here),
                "plan and baseline disagree at {members} members, {nodes} nodes"
            );
            let id = |name: &str| BenchmarkId::new(name, format!("{nodes}_nodes"));
            g.bench_function(id("plan"), |b| {
                b.iter(|| plan(ME, black_box(&recipients), owner, online_here))
            });
            g.bench_function(id("btreemap_baseline"), |b| {
                b.iter(|| btreemap_baseline(ME, black_box(&recipients), owner, online_here))
            });
            g.bench_function(id("ring_lookup_only"), |b| {
                b.iter(|| {
                    black_box(&recipients)
                        .iter()
                        .filter(|&&u| {
                            let node = owner(u);
                            node == ME || online_here(u)
                        })
                        .count()
                })
            });
        }
        g.finish();
    }
}

criterion_group!(benches, fanout);
criterion_main!(benches);
